"""The libvirt backend on a real guest: the test guest (blocktxn/demo/realguest/image.py)
booted as a libvirt domain with its ext4 data disk as qcow2 and qemu-ga on libvirt's guest-agent
channel. A backup with quiesce freeze goes through libvirt's fsFreeze/fsThaw; the
restored disk is a clean file system that needs no journal recovery and holds the guest
writer's records 1..N without a gap, N at least what the guest had written before the
cut, and the guest's own log after the thaw starts with exactly that content.

The test reads the guest's log through libvirt's qemu-agent-command (test-only: the agent
itself never uses passthrough)."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import libvirt
import libvirt_qemu
import pytest

from blocktxn.demo.lab import AgentProcess
from blocktxn.demo.realguest.image import GUEST_LOG, READY_MARKER, GuestImage
from blocktxn.demo.realguest.records import numbers
from blocktxn.demo.realguest.vm import BOOT_TIMEOUT, choose_accelerator, make_qcow2_data_disk
from blocktxn.v1 import agent_pb2 as pb
from blocktxn.v1 import agent_pb2_grpc as pb_grpc
from tests.guest.checks import assert_point_in_time
from tests.integration.conftest import libvirt_daemons  # noqa: F401  (the fixture)
from tests.integration.libvirt_lab import OWNED, URI

pytestmark = pytest.mark.integration


def domain_xml(name: str, image: GuestImage, disk: Path, console: Path) -> str:
    kind = "kvm" if choose_accelerator() == "kvm" else "qemu"
    return f"""<domain type='{kind}'><name>{name}</name><memory unit='MiB'>256</memory>
<vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type>
<kernel>{image.kernel}</kernel><initrd>{image.initrd}</initrd>
<cmdline>console=ttyS0 quiet panic=-1</cmdline></os>
<on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>
<backingStore/><target dev='vda' bus='virtio'/></disk>
<serial type='file'><source path='{console}'/><target port='0'/></serial>
<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
</devices></domain>"""


class LibvirtGuest:
    """The test guest as a transient libvirt domain."""

    def __init__(self, image: GuestImage, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.disk = workdir / "data.qcow2"
        make_qcow2_data_disk(self.disk)
        self.console = workdir / "console.log"
        self.name = f"btxguest-{int(time.time() * 1000) % 10**8}"
        self.conn = libvirt.open(URI)
        OWNED.add(self.name)
        self.dom: Any = self.conn.createXML(
            domain_xml(self.name, image, self.disk, self.console), 0)
        OWNED.started(self.name)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while READY_MARKER not in self.console_text():
            assert time.monotonic() < deadline, self.console_text()[-3000:]
            time.sleep(0.2)

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def agent(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        out = libvirt_qemu.qemuAgentCommand(
            self.dom, json.dumps({"execute": cmd, **({"arguments": args} if args else {})}),
            30, 0)
        return json.loads(out)["return"]

    def log(self) -> list[int]:
        """The guest writer's numbers, read in the guest (complete lines only)."""
        handle = self.agent("guest-file-open", {"path": GUEST_LOG, "mode": "r"})
        data = b""
        try:
            while True:
                chunk = self.agent("guest-file-read", {"handle": handle, "count": 65536})
                data += base64.b64decode(chunk["buf-b64"])
                if chunk["eof"]:
                    break
        finally:
            self.agent("guest-file-close", {"handle": handle})
        return numbers(data)

    def close(self) -> None:
        """Destroy the domain; should libvirt fail, end its QEMU by PID."""
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()
        OWNED.reap(self.name)


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
