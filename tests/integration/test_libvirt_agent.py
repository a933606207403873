"""What only the libvirt backend has: its freeze watchdog resumes a paused domain through
libvirt at the deadline whatever happens to the agent, and bad input (an unknown domain,
an unreachable URI, a raw disk, a guest without a guest agent) is one clear error that
changes nothing on the domain; a checkpoint whose libvirt metadata was lost is redefined
from the agent's record while QEMU still has its bitmap, and is not if the bitmap is gone."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable

import grpc
import libvirt
import pytest

from blocktxn.v1 import agent_pb2 as pb
from tests.integration.harness import wait_until
from tests.integration.libvirt_lab import LibvirtHost
from tests.integration.test_conformance import LibvirtLab

DISKS = [("vm1", "vda"), ("vm1", "vdb")]


def paused(host: LibvirtHost) -> bool:
    return bool(host.domain("vm1").dom.state(0)[0] == libvirt.VIR_DOMAIN_PAUSED)


def nothing_changed(host: LibvirtHost, txn: str) -> None:
    """No checkpoint, no job, no image, domain running."""
    vm = host.domain("vm1")
    assert vm.dom.listAllCheckpoints(0) == []
    assert not vm.job_running() and not paused(host)
    assert not list((host.agent.repo / "images").glob(f"*/*/{txn}.qcow2"))


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_paused_domain_is_resumed_at_its_deadline_whatever_happens_to_the_agent(
        make_libvirt_host: Callable[..., LibvirtHost], fault: str) -> None:
    host = make_libvirt_host()
    wl = host.workloads["vm1"]
    for c in range(8):
        wl.write("vda", c)
    assert host.backup("t1", DISKS, quiesce=pb.QUIESCE_PAUSE).yes
    base = wl.seq
    cut = host.cut("t2", DISKS, quiesce=pb.QUIESCE_PAUSE, freeze_timeout=3.0)
    assert paused(host)
    assert host.agent.proc is not None
    if fault == "kill":
        host.kill_agent()
    else:
        host.agent.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: not paused(host), timeout=30, what="the watchdog's resume")
        assert time.time() < cut.freeze_deadline + 2.0 + 0.1  # the wait's own slack
    finally:
        if fault == "stop":
            host.agent.proc.send_signal(signal.SIGCONT)
    if fault == "kill":
        host.start_agent()
    else:
        assert host.thaw("t2").thawed_on_own
    assert not host.prepare("t2").yes
    wl.write("vdb", 3)
    host.abort("t2")
    wait_until(lambda: set(host.bitmaps("vm1", "vda")) == {"blocktxn:t1"}, timeout=10,
               what="checkpoint t2 dropped")
    assert not host.domain("vm1").job_running()
    for _, disk in DISKS:  # OLD holds exactly every write since t1
        assert host.bitmaps("vm1", disk)["blocktxn:t1"]["count"] == 65536 * len(
            wl.clusters(disk, base))


def test_a_raw_disk_is_refused_before_anything_changes(
        make_libvirt_host: Callable[..., LibvirtHost]) -> None:
    host = make_libvirt_host({"vm1": ["vda", "vdb"]}, raw=("vdb",))
    with pytest.raises(grpc.RpcError) as err:
        host.cut("t1", DISKS, quiesce=pb.QUIESCE_PAUSE)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "vm1" in (err.value.details() or "") and "qcow2" in (err.value.details() or "")
    nothing_changed(host, "t1")
    assert host.backup("t2", [("vm1", "vda")], quiesce=pb.QUIESCE_NONE).yes  # qcow2 still works


def test_freeze_without_an_agent_in_the_guest_fails_the_cut_and_changes_nothing(
        make_libvirt_host: Callable[..., LibvirtHost]) -> None:
    host = make_libvirt_host()  # a guest-agent channel, but no guest OS to answer on it
    with pytest.raises(grpc.RpcError) as err:
        host.cut("t1", DISKS, quiesce=pb.QUIESCE_FREEZE, freeze_timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.value.details() or ""
    assert "vm1" in details and "freeze" in details
    nothing_changed(host, "t1")


@pytest.mark.parametrize("problem", ["unknown domain", "unreachable URI"])
def test_an_agent_with_a_bad_libvirt_vm_exits_naming_it(
        make_libvirt_host: Callable[..., LibvirtHost], problem: str) -> None:
    extra = (("--vm", "ghost=libvirt:no-such-domain") if problem == "unknown domain"
             else ("--libvirt-uri", "qemu+unix:///system?socket=/nonexistent/sock"))
    host = make_libvirt_host(start=False, extra=extra)
    host.agent.start()
    assert host.agent.proc is not None
    rc = host.agent.proc.wait(60)
    log = (host.agent.workdir / "agent.log").read_text()
    assert rc != 0
    assert ("ghost" if problem == "unknown domain" else "vm1") in log.splitlines()[-1]
    assert host.domain("vm1").dom.listAllCheckpoints(0) == []


def checkpoint_names(host: LibvirtHost) -> list[str]:
    return sorted(c.getName() for c in host.domain("vm1").dom.listAllCheckpoints(0))


@pytest.mark.parametrize("lost_by", ["metadata-only delete", "domain defined again"])
def test_a_checkpoint_whose_metadata_libvirt_lost_is_redefined_and_stays_incremental(
        make_libvirt_host: Callable[..., LibvirtHost], lost_by: str) -> None:
    host = make_libvirt_host()
    lab = LibvirtLab(host)
    lab.write(range(0, 8))
    lab.backup("t1")
    base = lab.seq
    lab.write(range(3, 6))
    vm = host.domain("vm1")
    if lost_by == "metadata-only delete":  # QEMU keeps its bitmaps either way
        vm.dom.checkpointLookupByName("blocktxn.t1").delete(
            libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    else:  # (a running domain keeps its checkpoints in libvirt's memory: stop it first)
        definition = vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        conn = vm.dom.connect()
        vm.stop()                           # QEMU stores the bitmaps in the images
        vm.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        conn.defineXML(definition)
        vm.start()                          # ... and loads them again
    assert checkpoint_names(host) == []
    host.restart_agent()
    host.inventory()                                 # the agent reads the disks: redefined
    assert checkpoint_names(host) == ["blocktxn.t1"]
    lab.write(range(7, 9))                           # the bitmaps kept recording meanwhile
    resp, cut = lab.cut("t2")
    assert [(m.mode, m.mode_reason) for m in resp.members] == [
        (pb.BACKUP_MODE_INCREMENTAL, "checkpoint blocktxn:t1 is usable")] * 2
    host.thaw("t2")
    vote = host.prepare("t2")
    assert vote.yes, vote.reason
    host.commit("t2")
    for d in lab.disks:                              # exactly the writes since t1
        assert lab.image("t2", d) == lab.workload.clusters(d, base, cut.seq)
    lab.assert_restores("t2", cut)
    lab.assert_checkpoint_exact("blocktxn:t2", cut.seq)


def test_a_checkpoint_whose_bitmap_is_gone_is_not_redefined_and_the_backup_is_full(
        make_libvirt_host: Callable[..., LibvirtHost]) -> None:
    host = make_libvirt_host()
    lab = LibvirtLab(host)
    lab.write(range(0, 8))
    lab.backup("t1")
    vm = host.domain("vm1")
    vm.dom.checkpointLookupByName("blocktxn.t1").delete(
        libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    host.kill_agent()
    vm.stop()                                        # QEMU stores the bitmaps in the images
    for d in vm.disks:                               # ... and they are removed from there
        subprocess.run(["qemu-img", "bitmap", "--remove", str(d.image), "blocktxn.t1"],
                       check=True)
    vm.start()
    host.start_agent()
    host.inventory()
    assert checkpoint_names(host) == []              # no checkpoint without its bitmap
    assert not list((host.agent.repo / "libvirt" / "vm1").glob("*.xml"))  # record gone
    lab.write(range(2, 4))
    resp, cut = lab.cut("t2")
    assert [m.mode for m in resp.members] == [pb.BACKUP_MODE_FULL] * 2, resp
    assert all("checkpoint bitmap missing" in m.mode_reason for m in resp.members), resp
    host.thaw("t2")
    assert host.prepare("t2").yes
    host.commit("t2")
    lab.assert_restores("t2", cut)
    assert checkpoint_names(host) == ["blocktxn.t2"]
    lab.assert_checkpoint_exact("blocktxn:t2", cut.seq)
