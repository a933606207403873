"""The `blocktxn` CLI against a real cluster, and the demo end to end."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from blocktxn.demo.lab import free_port, images_equal
from tests.integration.cluster import Cluster
from tests.integration.test_coordinator import two_hosts


def cli(cluster: Cluster | None, *args: str, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    base = [sys.executable, "-m", "blocktxn"]
    if cluster is not None:
        base += ["--coordinator", cluster.coordinators[0].address]
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_cli_covers_the_daily_work_with_exit_codes(make_cluster: Callable[..., Cluster],
                                                   tmp_path: Path) -> None:
    cluster = two_hosts(make_cluster, read_error=("d1",))
    ok = cli(cluster, "backup", "h1/vm1", "h2/vm2/d0", "--quiesce", "freeze", "--wait",
             "--json")
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["state"] == "committed" and result["set_id"] == result["txn_id"]
    assert {m["target"] for m in result["members"]} == {"h1/vm1/d0", "h1/vm1/d1", "h2/vm2/d0"}
    assert all(m["mode"] == "full" and m["bytes"] > 0 for m in result["members"])
    set_id = result["set_id"]

    started = cli(cluster, "backup", "h1/vm2")       # without --wait: the txn id
    assert started.returncode == 0 and started.stdout.strip().startswith("tx-")
    cluster.wait_done(started.stdout.strip())

    cluster.hosts["h2"].workloads["vm1"].write("d1", 3)
    cluster.hosts["h2"].workloads["vm1"].arm_read_error("d1", 3)
    aborted = cli(cluster, "backup", "h2/vm1", "h1/vm1", "--wait", "--json")
    assert aborted.returncode == 1
    bad = json.loads(aborted.stdout)
    assert bad["state"] == "aborted" and "d1" in bad["reason"] and "set_id" not in bad

    for args in (["txn", "list"], ["txn", "list", "--json"], ["txn", "show", set_id],
                 ["agents"], ["agents", "--json"], ["sets", "list"], ["sets", "show", set_id],
                 ["verify", set_id]):
        res = cli(cluster, *args)
        assert res.returncode == 0, (args, res.stderr)
    agents = json.loads(cli(cluster, "agents", "--json").stdout)
    assert {a["agent_id"] for a in agents} == {"h1", "h2"} and all(a["live"] for a in agents)
    txns = json.loads(cli(cluster, "txn", "list", "--json").stdout)
    assert [t["state"] for t in txns] == ["committed", "committed", "aborted"]
    shown = json.loads(cli(cluster, "sets", "show", set_id, "--json").stdout)
    assert len(shown["images"]) == 3
    # one JSON shape per object, whichever command prints it; global options may also
    # come after the subcommand
    here = ["--coordinator", cluster.coordinators[0].address]
    one = json.loads(cli(None, "txn", "show", set_id, "--json", *here).stdout)
    assert one == next(t for t in txns if t["txn_id"] == set_id) == {**result, **one}
    assert one["state"] == "committed" and one["decision"] == "commit"
    # where its time went: cut, each vote, decision, done, in that order
    assert 0 < one["created_at"] <= one["cut_done_at"] <= min(v["at"] for v in one["votes"])
    assert max(v["at"] for v in one["votes"]) <= one["decided_at"] <= one["done_at"]
    listed = json.loads(cli(None, "sets", "list", "--json", *here).stdout)
    assert next(s for s in listed if s["set_id"] == set_id) == shown
    assert {i["target"] for i in shown["images"]} == {m["target"] for m in result["members"]}

    dest = cluster.hosts["h1"].agent.restore_dir / "vm1-d0.raw"
    restored = cli(cluster, "restore", set_id, "h1/vm1/d0", "--to", str(dest))
    assert restored.returncode == 0, restored.stderr
    assert images_equal(dest, "raw", cluster.hosts["h1"].gas["vm1"].cuts[0].images["d0"], "raw")

    # bad input: exit 2 with one line, nothing changed
    before = cli(cluster, "txn", "list", "--json").stdout
    for args in (["backup", "h9/vm1"], ["backup", "h1/vm1", "--mode", "sideways"],
                 ["backup", "h1/vm1", "--speed", "-5"], ["txn", "show", "../x"],
                 ["txn", "cancel", "tx-unknown"], ["restore", set_id, "h1/vm1/d0", "--to",
                                                   "/etc/evil.raw"],
                 ["restore", set_id, "h1/vm1", "--to", str(dest) + "2"], ["sets", "show", "zz"]):
        res = cli(cluster, *args)
        assert res.returncode == 2, (args, res.returncode, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, (args, res.stderr)
    assert cli(cluster, "txn", "list", "--json").stdout == before
    # coordinator unreachable: exit 3, from --coordinator or the environment
    dead = f"127.0.0.1:{free_port()}"
    res = cli(None, "--coordinator", dead, "agents")
    assert res.returncode == 3 and "unreachable" in res.stderr
    res = cli(None, "txn", "list", env={"BLOCKTXN_COORDINATOR": dead})
    assert res.returncode == 3


def _running_under(path: Path) -> list[str]:
    """Command lines of live processes that name *path* (read from /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_demo_runs_end_to_end_passes_every_check_and_stops_everything_on_sigterm(
        tmp_path: Path) -> None:
    """The demo, kept running as an operator would, then stopped the way a service
    manager or `timeout` stops it: SIGTERM must stop every process it started."""
    import signal

    workdir = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "blocktxn", "demo", "--keep", "--workdir",
                             str(workdir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out = ""
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        while "keeps running" not in out and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out += line
        assert "keeps running" in out, out[-3000:]
        assert _running_under(workdir)              # the cluster is up
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=60)
        out += rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = _running_under(workdir)
        for line in left:  # started by this test's demo: never leave them behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "checks passed: 9/9" in out and "demo passed" in out
    for word in ("full backup committed", "aborted everywhere", "causal consistency",
                 "exactly every change"):
        assert word in out
    assert left == []


def test_a_killed_demo_leaves_no_process_behind(tmp_path: Path) -> None:
    """SIGKILL gives the demo no ``finally``: the kernel must stop what it started
    (coordinator, its etcd, agents, storage daemons) on its own."""
    import signal

    workdir = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "blocktxn", "demo", "--keep", "--workdir",
                             str(workdir)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    up: list[str] = []
    left: list[str] = []
    try:
        assert proc.stdout is not None
        out = ""
        deadline = time.monotonic() + 300
        while "workload:" not in out and time.monotonic() < deadline:  # agents registered
            line = proc.stdout.readline()
            if not line:
                break
            out += line
        assert "workload:" in out, out[-3000:]
        up = _running_under(workdir)
        proc.kill()
        proc.wait(30)
        deadline = time.monotonic() + 20
        while (left := _running_under(workdir)) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for line in _running_under(workdir):  # never leave them behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
    kinds = " ".join(up)
    assert "blocktxn.coordinator" in kinds and "blocktxn.agent" in kinds and "etcd" in kinds \
        and "qemu-storage-daemon" in kinds, up
    assert left == []


def test_a_passed_demo_removes_the_files_it_made() -> None:
    """Without --workdir the demo works in a temp dir of its own (its images take about
    1.7 GB): once it has passed, nothing of it is left (runs used to pile up in /tmp).
    TMPDIR is short: the demo's unix socket paths must fit in 108 bytes."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="btd", dir="/tmp"))
    try:
        done = subprocess.run([sys.executable, "-m", "blocktxn", "demo"], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp)})
        assert done.returncode == 0 and "demo passed" in done.stdout, done.stdout[-3000:]
        assert list(tmp.iterdir()) == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
