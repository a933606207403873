"""Bad input gets a clear gRPC status and changes nothing in QEMU or the repository."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from blocktxn.v1 import agent_pb2 as pb
from tests.integration.harness import Host, iter_files, restore, wait_until

DISKS = [("vm1", "d0"), ("vm1", "d1")]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def snapshot(host: Host) -> tuple[Any, ...]:
    """Everything a bad request must leave alone."""
    bitmaps = {d: sorted(host.bitmaps("vm1", d)) for _, d in DISKS}
    nodes = sorted(n["node-name"] for n in host.qmp("vm1", "query-named-block-nodes",
                                                   {"flat": True}))
    files = sorted(str(p) for p in iter_files(host.agent.repo))
    journal = (host.agent.repo / "journal.jsonl").read_bytes()
    return bitmaps, nodes, files, journal, host.jobs("vm1")


def expect(code: grpc.StatusCode, call: Callable[[], Any], *words: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value
    details = err.value.details() or ""
    assert "\n" not in details and details
    for w in words:
        assert w in details, details


def cut(host: Host, txn: str, members: list[tuple[str, str]], **kw: Any) -> Callable[[], Any]:
    return lambda: host.cut(txn, members, **kw)


def test_bad_requests_are_refused_and_change_nothing(make_host: Callable[..., Host]) -> None:
    host = make_host()
    host.workloads["vm1"].write("d0", 1)
    assert host.backup("t1", DISKS).yes
    host.cut("busy", [("vm1", "d0")])   # holds d0 in an open transaction
    before = snapshot(host)

    expect(NOT_FOUND, cut(host, "t2", [("vm9", "d0")]), "vm9")
    expect(NOT_FOUND, cut(host, "t2", [("vm1", "nope")]), "nope")
    expect(PRECONDITION, cut(host, "t2", [("vm1", "d0")]), "busy")
    expect(INVALID, cut(host, "../etc", [("vm1", "d1")]), "transaction id")
    expect(INVALID, cut(host, "t2", [("vm1", "d1;rm")]), "disk name")
    expect(INVALID, cut(host, "t2", []), "no members")
    expect(INVALID, cut(host, "t2", [("vm1", "d1"), ("vm1", "d1")]), "twice")
    expect(INVALID, cut(host, "t2", [("vm1", "d1")], mode=42), "mode")
    expect(INVALID, cut(host, "t2", [("vm1", "d1")], quiesce=9), "quiesce")
    expect(INVALID, cut(host, "t2", [("vm1", "d1")], freeze_timeout=-1), "freeze timeout")
    expect(PRECONDITION, cut(host, "t2", [("vm1", "d1")], quiesce=pb.QUIESCE_PAUSE), "stop")
    # "busy" was cut with a freeze and not thawed yet: vm1 cannot be frozen a second time
    expect(PRECONDITION, cut(host, "t2", [("vm1", "d1")]), "frozen by transaction busy")
    # a repeated txn id with other members is not the same transaction
    expect(PRECONDITION, cut(host, "busy", [("vm1", "d1")]), "other members")

    stub = host.stub
    expect(NOT_FOUND, lambda: stub.Thaw(pb.ThawRequest(txn_id="ghost"), timeout=10))
    expect(NOT_FOUND, lambda: stub.Commit(pb.CommitRequest(txn_id="ghost"), timeout=10))
    expect(INVALID, lambda: stub.Commit(pb.CommitRequest(txn_id=""), timeout=10))
    expect(PRECONDITION, lambda: stub.Commit(pb.CommitRequest(txn_id="busy"), timeout=10),
           "busy")  # no YES vote yet
    expect(PRECONDITION, lambda: stub.Abort(pb.AbortRequest(txn_id="t1"), timeout=10),
           "committed")
    restore_dir = host.agent.restore_dir
    for dest in ("/etc/passwd-restore", str(restore_dir / ".." / "escape.raw"), ""):
        expect(INVALID, lambda d=dest: stub.Restore(pb.RestoreRequest(  # type: ignore[misc]
            set_id="t1", vm="vm1", disk="d0", destination=d), timeout=10), "restore destination")
    expect(INVALID, lambda: stub.Restore(pb.RestoreRequest(
        set_id="t1", vm="vm1", disk="d0", destination=str(restore_dir / "x"), format="vmdk"),
        timeout=10), "format")
    expect(NOT_FOUND, lambda: stub.Restore(pb.RestoreRequest(
        set_id="t9", vm="vm1", disk="d0", destination=str(restore_dir / "x")), timeout=10), "t9")
    expect(NOT_FOUND, lambda: stub.Verify(pb.VerifyRequest(set_id="t9"), timeout=10))
    expect(INVALID, lambda: stub.Verify(pb.VerifyRequest(set_id="a/b"), timeout=10))
    # numbers outside their documented ranges, oversized text
    for bad in (float("nan"), float("inf"), -1.0, 1e12):
        expect(INVALID, lambda b=bad: stub.Prepare(  # type: ignore[misc]
            pb.PrepareRequest(txn_id="busy", timeout_s=b), timeout=10), "timeout")
    for bad in (1e-6, float("nan"), 1e9):
        expect(INVALID, lambda b=bad: next(iter(stub.Status(  # type: ignore[misc]
            pb.StatusRequest(txn_id="busy", interval_s=b), timeout=10))), "interval")
    expect(INVALID, lambda: stub.Abort(pb.AbortRequest(txn_id="busy", reason="x" * 5000),
                                       timeout=10), "reason")
    expect(INVALID, cut(host, "t2", [("vm1", "d1")], freeze_timeout=float("nan")),
           "freeze timeout")
    assert snapshot(host) == before

    # a prepare of a transaction never cut here is a NO vote, not an error
    assert not host.prepare("ghost").yes
    # an abort of an unknown transaction is remembered: a late cut of it is refused
    host.abort("late")
    expect(PRECONDITION, cut(host, "late", [("vm1", "d1")]), "aborted")
    host.abort("busy")


def test_agent_command_line_errors_exit_2_with_one_line(tmp_path: Any) -> None:
    for args in (["--vm", "bad spec"], ["--vm", "vm1=/x,foo=1"], ["--id", "a b"]):
        argv = {"--id": "a1", "--listen": "127.0.0.1:0", "--repo": str(tmp_path)}
        extra = list(args)
        if "--id" in extra:
            argv["--id"] = extra[1]
            extra = []
        cmd = [sys.executable, "-m", "blocktxn.agent", *[x for kv in argv.items() for x in kv],
               *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert res.returncode == 2, (args, res)
        assert len(res.stdout.strip().splitlines()) == 1 and "blocktxn agent:" in res.stdout


def test_a_corrupt_journal_stops_the_agent_with_one_line(tmp_path: Any) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    aborted = b'{"txn":"%s","type":"Aborted","data":{"reason":"x"}}\n'
    (repo / "journal.jsonl").write_bytes(aborted % b"t1" + b"{garbage\n" + aborted % b"t2")
    cmd = [sys.executable, "-m", "blocktxn.agent", "--id", "a1", "--listen", "127.0.0.1:0",
           "--repo", str(repo)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res
    assert res.stdout.strip().splitlines() == [res.stdout.strip()]
    assert "journal.jsonl: line 2 is corrupt" in res.stdout


def test_a_planted_symlink_cannot_redirect_a_restore(make_host: Callable[..., Host],
                                                      tmp_path: Any) -> None:
    host = make_host()
    host.workloads["vm1"].write("d0", 3)
    assert host.backup("t1", DISKS).yes
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"precious")
    restore_dir = host.agent.restore_dir
    restore_dir.mkdir(parents=True, exist_ok=True)
    (restore_dir / ".d0.raw.partial").symlink_to(outside)  # a guess at the temp file
    path = restore(host, "t1", "vm1", "d0", "d0.raw")
    assert outside.read_bytes() == b"precious"
    assert path == restore_dir / "d0.raw" and not path.is_symlink()
    assert path.stat().st_size == 32 << 20


class _Logging:
    """An agent process whose stderr is read on a thread, line by line."""

    def __init__(self, tmp_path: Any) -> None:
        cmd = [sys.executable, "-m", "blocktxn.agent", "--id", "a1", "--listen",
               "127.0.0.1:0", "--repo", str(tmp_path / "repo"),
               "--vm", f"vm1={tmp_path / 'gone.sock'}", "--coordinator", "127.0.0.1:1"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, text: str) -> None:
        wait_until(lambda: any(text in line for line in self.lines), timeout=60,
                   what=f"{text!r} in the agent's log")

    def terminate(self) -> tuple[int, float]:
        """SIGTERM; the exit code and how long the exit took."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return code, time.monotonic() - t0


def test_an_agent_whose_peers_are_gone_exits_promptly_on_sigterm(tmp_path: Any) -> None:
    agent = _Logging(tmp_path)
    agent.wait_for("serving on")  # after its 5 s wait for the VM
    agent.wait_for("registration with")  # heartbeats failing
    code, took = agent.terminate()
    assert code == 0 and took < 4, (code, took)


def test_a_sigterm_while_the_agent_starts_is_a_clean_stop(tmp_path: Any) -> None:
    """A service manager's stop that comes while the agent is still starting (here:
    waiting for its VM) is a clean stop once the start is over, not a death by the
    signal's default action (exit -15, stop hooks not run)."""
    agent = _Logging(tmp_path)
    agent.wait_for("journal replayed")  # inside the start, before the VM wait
    code, took = agent.terminate()
    assert code == 0, (code, took, "".join(agent.lines[-5:]))
    assert took < 20


def test_an_agent_given_a_port_in_use_says_so_in_one_line(tmp_path: Any) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "blocktxn.agent", "--id", "a1",
                              "--listen", f"127.0.0.1:{port}", "--repo", str(tmp_path / "r")],
                             capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stdout.strip() == (f"blocktxn agent: cannot start: cannot listen on "
                                  f"127.0.0.1:{port}: the address is in use or not this "
                                  "host's"), res.stdout
    assert "Traceback" not in res.stderr
