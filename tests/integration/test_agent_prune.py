"""Removing backup sets on one agent: a later image is rebased first, so every kept set
still restores to its cut and verifies; crashes between the steps are retried to the
same end; checkpoints are never touched."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import time
from collections.abc import Callable

import grpc
import pytest

from blocktxn.demo.lab import images_equal
from blocktxn.v1 import agent_pb2 as pb
from tests.integration.harness import Host, iter_files, restore, wait_until

DISKS = [("vm1", "d0"), ("vm1", "d1")]


def forget(host: Host, set_id: str, timeout: float = 60) -> None:
    """Ask until the agent says every image of the set is gone."""
    deadline = time.monotonic() + timeout
    while not host.stub.ForgetImages(pb.ForgetImagesRequest(set_id=set_id), timeout=30).done:
        assert time.monotonic() < deadline, f"{set_id} not forgotten"
        time.sleep(0.1)


def backups(host: Host, names: list[str]) -> dict[str, dict[str, object]]:
    """One backup per name, writes between them; the content of each disk at each cut."""
    wl, ga = host.workloads["vm1"], host.gas["vm1"]
    cuts: dict[str, dict[str, object]] = {}
    for n, name in enumerate(names):
        for c in range(n * 3, n * 3 + 6):  # overlapping: later sets overwrite earlier data
            for _, disk in DISKS:
                wl.write(disk, c)
        vote = host.backup(name, DISKS)
        assert vote.yes, vote.reason
        cuts[name] = dict(ga.cuts[-1].images)
    return cuts


def assert_restores(host: Host, cuts: dict[str, dict[str, object]], kept: list[str]) -> None:
    for set_id in kept:
        for vm, disk in DISKS:
            out = restore(host, set_id, vm, disk, f"{set_id}-{disk}-{time.monotonic_ns()}.raw")
            assert images_equal(out, "raw", cuts[set_id][disk], "raw"), (set_id, disk)  # type: ignore[arg-type]
            out.unlink()
        checks = host.stub.Verify(pb.VerifyRequest(set_id=set_id), timeout=60).checks
        assert checks and all(c.ok for c in checks), checks


def catalog(host: Host) -> dict[str, str]:
    """image -> backing, from the agent's catalog."""
    return {i.image: i.backing for i in host.stub.ListImages(pb.ListImagesRequest(),
                                                             timeout=10).images}


def image_files(host: Host) -> set[str]:
    root = host.agent.repo
    return {str(p.relative_to(root)) for p in iter_files(root / "images")}


def test_forgetting_sets_keeps_every_other_set_restorable(make_host: Callable[..., Host]
                                                          ) -> None:
    host = make_host()
    cuts = backups(host, ["s1", "s2", "s3", "s4"])
    bitmaps = {d: host.bitmaps("vm1", d) for _, d in DISKS}
    forget(host, "s2")  # a middle incremental: s3 is rebased onto s1
    cat = catalog(host)
    assert not any("/s2." in i for i in cat)
    assert cat["images/vm1/d0/s3.qcow2"] == "images/vm1/d0/s1.qcow2"
    assert_restores(host, cuts, ["s1", "s3", "s4"])
    forget(host, "s1")  # the full at the base: s3 becomes a full of its own
    cat = catalog(host)
    assert cat["images/vm1/d0/s3.qcow2"] == ""
    assert_restores(host, cuts, ["s3", "s4"])
    assert image_files(host) == set(catalog(host))  # no file outside the catalog
    assert {d: host.bitmaps("vm1", d) for _, d in DISKS}.keys() == bitmaps.keys()
    for _, d in DISKS:  # checkpoints untouched: the next incremental still has it all
        assert set(host.bitmaps("vm1", d)) == {"blocktxn:s4"}
    with pytest.raises(grpc.RpcError) as newest:
        host.stub.ForgetImages(pb.ForgetImagesRequest(set_id="s4"), timeout=10)
    assert newest.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "newest" in (newest.value.details() or "")
    forget(host, "no-such-set")  # nothing here: done at once
    more = backups(host, ["s5"])
    assert host.stub.ListImages(pb.ListImagesRequest(vm="vm1", disk="d0"),
                                timeout=10).images[-1].mode == pb.BACKUP_MODE_INCREMENTAL
    assert_restores(host, {**cuts, **more}, ["s3", "s4", "s5"])


@pytest.mark.parametrize("point", ["agent_after_rebase", "agent_after_delete"])
def test_an_agent_killed_during_a_removal_finishes_it_after_restart(
        make_host: Callable[..., Host], point: str) -> None:
    host = make_host()
    armed = host.workdir / "failpoints"
    host.agent.env = {"BLOCKTXN_FAILPOINT_FILE": str(armed)}
    host.restart_agent()
    cuts = backups(host, ["s1", "s2", "s3"])
    armed.write_text(f"{point}=exit\n")
    with pytest.raises(grpc.RpcError):
        forget(host, "s2", timeout=10)  # the agent dies at the failpoint
    armed.unlink()
    assert host.agent.proc is not None
    host.agent.proc.wait(10)
    host.start_agent()
    forget(host, "s2")
    assert not any("/s2." in i for i in catalog(host))
    assert image_files(host) == set(catalog(host))
    assert_restores(host, cuts, ["s1", "s3"])


def test_max_chain_makes_an_auto_backup_full(make_host: Callable[..., Host]) -> None:
    host = make_host()
    host.agent.extra = ["--max-chain", "3"]
    host.restart_agent()
    backups(host, ["s1", "s2", "s3", "s4"])
    modes = [(i.set_id, i.mode, i.backing) for i in host.stub.ListImages(
        pb.ListImagesRequest(vm="vm1", disk="d0"), timeout=10).images]
    assert [m for _, m, _ in modes] == [pb.BACKUP_MODE_FULL, pb.BACKUP_MODE_INCREMENTAL,
                                         pb.BACKUP_MODE_INCREMENTAL, pb.BACKUP_MODE_FULL]


def test_a_rebase_cut_short_after_its_header_write_is_redone(make_host: Callable[..., Host]
                                                             ) -> None:
    """qemu-img rebase (default cache) writes the new backing into the header before
    the copied clusters are durable: a crash there leaves the later image naming its new
    backing with data missing, and running the rebase again finds nothing to do. The
    agent does not trust the header: until its catalog records the rebase, it puts the
    old backing back (header only) and rebases again, writethrough."""
    host = make_host()
    cuts = backups(host, ["s1", "s2", "s3"])
    for _, disk in DISKS:  # the state such a crash leaves: header new, clusters not copied
        subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "s1.qcow2", "-F",
                        "qcow2", str(host.image(f"images/vm1/{disk}/s3.qcow2"))], check=True)
    forget(host, "s2")
    assert_restores(host, cuts, ["s1", "s3"])


def test_a_removal_is_refused_while_a_restore_reads_the_disk(make_host: Callable[..., Host]
                                                            ) -> None:
    host = make_host()
    slow = host.workdir / "slowbin"
    slow.mkdir()
    real = shutil.which("qemu-img")
    started = host.workdir / "convert-started"
    (slow / "qemu-img").write_text(  # restores (convert) take 4 s more
        f'#!/bin/sh\n[ "$1" = convert ] && touch {started} && sleep 4\nexec {real} "$@"\n')
    (slow / "qemu-img").chmod(0o755)
    host.agent.env = {"PATH": f"{slow}:{os.environ['PATH']}"}
    host.restart_agent()
    cuts = backups(host, ["s1", "s2", "s3"])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started.unlink(missing_ok=True)
        reading = pool.submit(restore, host, "s1", "vm1", "d0", "s1-d0.raw")
        wait_until(started.exists, timeout=60, what="the restore's copy under way")
        for check_only in (True, False):
            with pytest.raises(grpc.RpcError) as refused:
                host.stub.ForgetImages(pb.ForgetImagesRequest(set_id="s2",
                                                              check_only=check_only),
                                       timeout=10)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "restore or verify of vm1/d0" in (refused.value.details() or "")
        out = reading.result(timeout=60)
    assert images_equal(out, "raw", cuts["s1"]["d0"], "raw")  # type: ignore[arg-type]
    assert host.stub.ForgetImages(pb.ForgetImagesRequest(set_id="s2", check_only=True),
                                  timeout=10).remaining == 2
    forget(host, "s2")
    assert_restores(host, cuts, ["s1", "s3"])


def test_a_removal_asked_during_a_backup_waits_for_it_and_the_next_cut_waits_for_the_removal(
        make_host: Callable[..., Host]) -> None:
    """Back-to-back backups of a disk must not starve its prune (the soak run: every
    ForgetImages met the next open transaction and was refused, for ever): a removal
    asked while a transaction holds the disk is accepted and waits for it; a cut asked
    right after that transaction waits for the removal's step."""
    host = make_host()
    cuts = backups(host, ["s1", "s2", "s3"])
    before = catalog(host)
    host.cut("t4", DISKS, speed=256 << 10)
    host.thaw("t4")
    left = host.stub.ForgetImages(pb.ForgetImagesRequest(set_id="s2"), timeout=10)
    assert not left.done and left.remaining == 2
    time.sleep(1.0)
    assert catalog(host) == before  # nothing is touched while the transaction runs
    vote = host.prepare("t4")
    assert vote.yes, vote.reason
    host.commit("t4")
    cuts["t4"] = dict(host.gas["vm1"].cuts[-1].images)
    vote = host.backup("t5", DISKS)  # right after: waits, then runs
    assert vote.yes, vote.reason
    forget(host, "s2")
    assert not [i for i in catalog(host) if "/s2." in i]
    assert_restores(host, cuts, ["s1", "s3", "t4"])
