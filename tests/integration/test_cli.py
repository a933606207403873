"""The `blocktxn` CLI against a real cluster, and the demo end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def test_demo_runs_end_to_end_and_passes_every_check(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "blocktxn", "demo", "--workdir",
                          str(tmp_path / "demo")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "checks passed: 9/9" in res.stdout and "demo passed" in res.stdout
    for word in ("full backup committed", "aborted everywhere", "causal consistency",
                 "exactly every change"):
        assert word in res.stdout
