"""The test guest as a transient libvirt domain (KVM if usable, else TCG): its ext4 data
disk as qcow2 (target ``vda``), qemu-ga on libvirt's guest-agent channel. The test reads
the guest's log through libvirt's qemu-agent-command (test-only: the agent itself never
uses passthrough). Its QEMU is owned (libvirt_lab.OWNED): ended by PID should libvirt
fail at teardown."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from blocktxn.demo.realguest.image import GUEST_LOG, READY_MARKER, GuestImage
from blocktxn.demo.realguest.records import numbers
from blocktxn.demo.realguest.vm import BOOT_TIMEOUT, choose_accelerator, make_qcow2_data_disk
from tests.integration.libvirt_lab import OWNED, URI


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
