"""The bare-QEMU backend on a real guest: the test guest booted under QEMU with its ext4
data disk as qcow2 (format node ``data``), served by a real ``blocktxn agent`` through a
QMP monitor of its own and the guest's qemu-ga socket. A full and then an incremental
backup with quiesce freeze go through the agent's gRPC API (Cut, Thaw, Prepare, Commit);
each restore is a clean file system that needs no journal recovery and holds the guest
writer's records 1..N without a gap, N at least what the guest had written before the
cut and nothing it wrote after the thaw. The test reads the guest's log through qemu-ga
between the agent's calls (the agent opens the socket only for a freeze or a thaw)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from blocktxn.demo.lab import AgentProcess
from blocktxn.demo.realguest.image import GuestImage
from blocktxn.demo.realguest.qga import call_once
from blocktxn.demo.realguest.records import guest_log
from blocktxn.demo.realguest.vm import DATA_NODE, GuestVm, make_qcow2_data_disk
from blocktxn.v1 import agent_pb2 as pb
from blocktxn.v1 import agent_pb2_grpc as pb_grpc
from tests.guest.checks import assert_point_in_time

pytestmark = pytest.mark.integration

RPC = 120.0  # generous: a busy 2-core machine


@pytest.fixture(scope="module")
def qcow2_guest(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[GuestVm]:
    """One boot for the module: the guest with a qcow2 data disk."""
    work = tmp_path_factory.mktemp("qemu-agent-guest")
    disk = work / "data.qcow2"
    make_qcow2_data_disk(disk)
    vm = GuestVm(guest_image, work / "vm", disk, data_format="qcow2")
    try:
        vm.start()
        yield vm
    finally:
        vm.close()


def bitmaps(vm: GuestVm) -> set[str]:
    """Named dirty bitmaps of the data disk, as QEMU has them (the test's own monitor)."""
    for n in vm.qmp("query-named-block-nodes", {"flat": True}):
        if n["node-name"] == DATA_NODE:
            return {b["name"] for b in n.get("dirty-bitmaps", []) if "name" in b}
    raise KeyError(DATA_NODE)


def test_a_freeze_through_qemu_ga_gives_clean_restores_of_a_full_and_an_incremental(
        qcow2_guest: GuestVm, tmp_path: Path) -> None:
    vm = qcow2_guest
    agent = AgentProcess("host1", tmp_path / "agent", [], {}, extra=[
        "--vm", f"vm1={vm.agent_qmp_socket},ga={vm.agent_socket}"])
    agent.start()
    channel = grpc.insecure_channel(agent.address)
    try:
        stub = pb_grpc.AgentServiceStub(channel)
        inv = stub.GetInventory(pb.GetInventoryRequest(), timeout=60, wait_for_ready=True)
        assert [(v.name, v.connected, v.has_guest_agent) for v in inv.vms] == [
            ("vm1", True, True)]
        assert [(d.name, d.format) for d in inv.vms[0].disks] == [(DATA_NODE, "qcow2")]
        previous = ""
        for txn, mode in (("t1", pb.BACKUP_MODE_FULL), ("t2", pb.BACKUP_MODE_INCREMENTAL)):
            before = guest_log(vm.agent_socket)          # acknowledged before the cut
            cut = stub.Cut(pb.CutRequest(
                txn_id=txn, quiesce=pb.QUIESCE_FREEZE, freeze_timeout_s=60,
                members=[pb.CutMember(vm="vm1", disk=DATA_NODE)]), timeout=RPC)
            assert [m.mode for m in cut.members] == [mode]
            assert cut.members[0].previous_checkpoint == previous
            assert call_once(vm.agent_socket, "guest-fsfreeze-status") == "frozen"
            thaw = stub.Thaw(pb.ThawRequest(txn_id=txn), timeout=RPC)
            assert not thaw.thawed_on_own
            assert cut.frozen_at <= cut.cut_at <= thaw.thawed_at
            assert call_once(vm.agent_socket, "guest-fsfreeze-status") == "thawed"
            after_thaw = guest_log(vm.agent_socket)
            vote = stub.Prepare(pb.PrepareRequest(txn_id=txn, timeout_s=RPC), timeout=RPC)
            assert vote.yes, vote.reason
            stub.Commit(pb.CommitRequest(txn_id=txn), timeout=RPC)
            # the commit dropped the previous checkpoint: only the new one records
            assert bitmaps(vm) == {cut.members[0].checkpoint}
            images = stub.ListImages(pb.ListImagesRequest(vm="vm1"), timeout=RPC).images
            mine = [i for i in images if i.set_id == txn]
            assert len(mine) == 1 and mine[0].mode == mode
            assert bool(mine[0].backing) == (mode == pb.BACKUP_MODE_INCREMENTAL)
            out = Path(stub.Restore(pb.RestoreRequest(
                set_id=txn, vm="vm1", disk=DATA_NODE, format="raw",
                destination=str(agent.restore_dir / f"{txn}.raw")), timeout=RPC).path)
            assert_point_in_time(out, before, after_thaw)
            previous = cut.members[0].checkpoint
    finally:
        channel.close()
        agent.stop()
