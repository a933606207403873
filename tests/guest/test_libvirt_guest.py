"""The libvirt backend on a real guest: the test guest (blocktxn/demo/realguest/image.py)
booted as a libvirt domain with its ext4 data disk as qcow2 and qemu-ga on libvirt's
guest-agent channel. A backup with quiesce freeze goes through libvirt's fsFreeze/fsThaw;
the restored disk is a clean file system that needs no journal recovery and holds the
guest writer's records 1..N without a gap, N at least what the guest had written before
the cut, and the guest's own log after the thaw starts with exactly that content.

The test reads the guest's log through libvirt's qemu-agent-command (test-only: the agent
itself never uses passthrough)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from blocktxn.demo.lab import AgentProcess
from blocktxn.demo.realguest.image import GuestImage
from blocktxn.v1 import agent_pb2 as pb
from blocktxn.v1 import agent_pb2_grpc as pb_grpc
from tests.guest.checks import assert_point_in_time
from tests.guest.libvirt_guest import LibvirtGuest
from tests.integration.conftest import libvirt_daemons  # noqa: F401  (the fixture)
from tests.integration.libvirt_lab import URI

pytestmark = pytest.mark.integration


@pytest.fixture
def libvirt_guest(guest_image: GuestImage, tmp_path: Path, request: pytest.FixtureRequest
                  ) -> Iterator[LibvirtGuest]:
    request.getfixturevalue("libvirt_daemons")  # libvirtd, started if none runs
    guest = LibvirtGuest(guest_image, tmp_path / "guest")
    try:
        guest.wait_ready()
        yield guest
    finally:
        guest.close()


def test_a_freeze_through_libvirt_gives_a_clean_restore_with_every_record_before_the_cut(
        libvirt_guest: LibvirtGuest, tmp_path: Path) -> None:
    guest = libvirt_guest
    agent = AgentProcess("host1", tmp_path / "agent", [], {},
                         extra=["--libvirt-uri", URI, "--vm", f"vm1=libvirt:{guest.name}"])
    agent.start()
    channel = grpc.insecure_channel(agent.address)
    try:
        stub = pb_grpc.AgentServiceStub(channel)
        inv = stub.GetInventory(pb.GetInventoryRequest(), timeout=60, wait_for_ready=True)
        assert inv.vms[0].connected and inv.vms[0].has_guest_agent
        for txn in ("t1", "t2"):
            before = guest.log()                  # acknowledged before the cut
            stub.Cut(pb.CutRequest(txn_id=txn, quiesce=pb.QUIESCE_FREEZE,
                                   freeze_timeout_s=60,
                                   members=[pb.CutMember(vm="vm1", disk="vda")]), timeout=120)
            assert guest.agent("guest-fsfreeze-status") == "frozen"
            stub.Thaw(pb.ThawRequest(txn_id=txn), timeout=60)
            assert guest.agent("guest-fsfreeze-status") == "thawed"
            after_thaw = guest.log()
            vote = stub.Prepare(pb.PrepareRequest(txn_id=txn, timeout_s=120), timeout=120)
            assert vote.yes, vote.reason
            stub.Commit(pb.CommitRequest(txn_id=txn), timeout=60)
            out = Path(stub.Restore(pb.RestoreRequest(
                set_id=txn, vm="vm1", disk="vda", format="raw",
                destination=str(agent.restore_dir / f"{txn}.raw")), timeout=120).path)
            assert_point_in_time(out, before, after_thaw)
        assert inv.vms[0].disks[0].format == "qcow2"
    finally:
        channel.close()
        agent.stop()
