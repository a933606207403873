"""A libvirt lab for the agent tests: libvirtd itself, TCG domains with qcow2 disks and
no guest OS, and a writer for their disks.

Writing into a disk that libvirt's QEMU holds: another opener of the image is refused
(image locking), and a second block backend on the disk's node is refused too (the
guest device does not share writes). So the TEST (never the agent, which never uses
QMP passthrough) writes through the guest device's own block backend with the
monitor's ``qemu-io -d /machine/peripheral/<alias>/virtio-backend`` (libvirt's
qemu-monitor-command). Every write is acknowledged when the call returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from blocktxn.agent.config import LIBVIRT
from blocktxn.demo.guest import Workload
from blocktxn.demo.lab import AgentProcess, LabDisk, LabVm
from tests.integration.harness import Host

URI = "qemu:///system"
PIDFILES = {"virtlogd": Path("/run/virtlogd.pid"), "libvirtd": Path("/run/libvirtd.pid")}
# Where libvirtd 9.0 (root, qemu:///system) writes each running domain's QEMU PID
# (<domain>.pid). It stays there when libvirtd dies, and so does the QEMU.
QEMU_PID_DIR = Path("/run/libvirt/qemu")


def _running(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def domain_qemu(pid: int, domain: str) -> bool:
    """Whether *pid* is a live qemu-system process that libvirt started for *domain*
    (its ``-name guest=DOMAIN,...``); a reused PID or a zombie is not."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z" or not os.path.basename(argv[0]).startswith(b"qemu-system"):
        return False
    names = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == b"-name"]
    return any(f"guest={domain}".encode() in n.split(b",") for n in names)


class OwnedDomains:
    """The libvirt domains this test process created, and their QEMU PIDs.

    libvirtd leaves its domains' QEMUs running when it stops or dies, and a fixture
    whose libvirt calls fail cannot destroy them: :meth:`reap` then ends the QEMU of a
    domain it created, found by libvirtd's pid file (or a PID seen at start), if that
    PID is still a qemu-system process of that very domain. Nothing else is touched.
    """

    def __init__(self, pid_dir: Path = QEMU_PID_DIR) -> None:
        self.pid_dir = pid_dir
        self.pids: dict[str, set[int]] = {}

    def add(self, domain: str) -> None:
        """Own *domain* (created by this process)."""
        self.pids.setdefault(domain, set())

    def _pidfile(self, domain: str) -> int | None:
        try:
            return int((self.pid_dir / f"{domain}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def started(self, domain: str) -> None:
        """Remember the PID of an owned domain's QEMU, just started."""
        pid = self._pidfile(domain)
        if pid is not None and domain in self.pids:
            self.pids[domain].add(pid)

    def reap(self, domain: str, timeout: float = 10.0) -> list[int]:
        """End the QEMU of owned *domain* if one still runs (SIGTERM, then SIGKILL);
        the PIDs it ended. The domain stays owned (it may be started again)."""
        if domain not in self.pids:
            return []
        candidates = set(self.pids[domain])
        if (pid := self._pidfile(domain)) is not None:
            candidates.add(pid)
        ended = []
        for pid in sorted(candidates):
            if not domain_qemu(pid, domain):
                continue
            for sig, wait in ((signal.SIGTERM, timeout / 2), (signal.SIGKILL, timeout / 2)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                deadline = time.monotonic() + wait
                while domain_qemu(pid, domain) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not domain_qemu(pid, domain):
                    break
            ended.append(pid)
        self.pids[domain] -= set(ended)
        return ended

    def reap_all(self) -> dict[str, list[int]]:
        """:meth:`reap` every owned domain; domain -> the PIDs ended (if any)."""
        return {d: ended for d in list(self.pids) if (ended := self.reap(d))}

    def forget(self, domain: str) -> None:
        self.pids.pop(domain, None)


# Every domain the libvirt fixtures create; the session fixture reaps what is left.
OWNED = OwnedDomains()


@contextlib.contextmanager
def monitor_log(path: Path) -> Iterator[Path]:
    """While inside, libvirtd also writes every QMP command it sends QEMU to *path*
    (``QEMU_MONITOR_SEND_MSG ... msg={...}``, from its qemu.qemu_monitor log source);
    the daemon's own log settings are restored after."""
    def admin(*argv: str) -> str:
        return subprocess.run(["virt-admin", *argv], check=True, capture_output=True,
                              text=True, timeout=30).stdout.split(":", 1)[1].strip()

    filters, outputs = admin("daemon-log-filters"), admin("daemon-log-outputs")
    path.touch()
    subprocess.run(["virt-admin", "daemon-log-filters", "2:qemu.qemu_monitor"],
                   check=True, timeout=30)
    subprocess.run(["virt-admin", "daemon-log-outputs", f"2:file:{path} {outputs}".strip()],
                   check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["virt-admin", "daemon-log-filters", filters], timeout=30)
        subprocess.run(["virt-admin", "daemon-log-outputs", outputs], timeout=30)


class LibvirtDaemons:
    """virtlogd and libvirtd (monolithic), started only if not running; stop() ends only
    the ones this object started, by their PIDs."""

    def __init__(self) -> None:
        self.started: dict[str, int] = {}

    def start(self) -> None:
        for name in ("virtlogd", "libvirtd"):  # libvirtd needs virtlogd for QEMU's logs
            if _running(PIDFILES[name]) is not None:
                continue
            subprocess.run([name, "-d"], check=True)
            deadline = time.monotonic() + 20
            while (pid := _running(PIDFILES[name])) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not start")
                time.sleep(0.05)
            self.started[name] = pid
        deadline = time.monotonic() + 30
        while True:
            try:
                libvirt.open(URI).close()
                return
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        for name in ("libvirtd", "virtlogd"):
            pid = self.started.pop(name, None)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)


def domain_xml(name: str, disks: list[LabDisk], raw: tuple[str, ...] = ()) -> str:
    """A TCG domain with virtio disks named as *disks* (vda, vdb, ...) and no OS. QEMU
    runs as root here (static DAC label) so that it may open files under the tests'
    private temporary directory."""
    devs = []
    for d in disks:
        fmt = "raw" if d.name in raw else "qcow2"
        devs.append(f"""<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>
  <source file='{d.image}'/><backingStore/><target dev='{d.name}' bus='virtio'/>
  <alias name='ua-{d.name}'/></disk>""")
    return f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>
<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{''.join(devs)}
<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
</devices></domain>"""


@dataclass
class LibvirtLabVm(LabVm):
    """A LabVm that is a persistent libvirt domain; its disks are named by their libvirt
    targets (vda, vdb, ...), as the agent names them."""

    domain: str = ""
    raw: tuple[str, ...] = field(default=())
    _conn: Any = None

    @classmethod
    def create_domain(cls, name: str, workdir: Path, disk_names: list[str],
                      size: int = 32 << 20, raw: tuple[str, ...] = ()) -> LibvirtLabVm:
        workdir.mkdir(parents=True, exist_ok=True)
        disks = []
        for d in disk_names:
            image = workdir / f"{d}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "raw" if d in raw else "qcow2",
                            str(image), str(size)], check=True)
            disks.append(LabDisk(d, image, size))
        vm = cls(name, workdir, disks, domain=f"btxtest-{name}-{uuid.uuid4().hex[:8]}",
                 raw=raw)
        vm._conn = libvirt.open(URI)
        OWNED.add(vm.domain)
        vm._conn.defineXML(domain_xml(vm.domain, disks, raw))
        return vm

    @property
    def dom(self) -> Any:
        return self._conn.lookupByName(self.domain)

    def start(self) -> None:
        if not self.dom.isActive():
            self.dom.create()
            OWNED.started(self.domain)

    def stop(self) -> None:
        """Shut QEMU down cleanly (no guest to ask: SIGTERM, which stores the bitmaps)."""
        if self.dom.isActive():
            self.dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)

    def kill(self) -> None:
        """SIGKILL QEMU: its bitmaps are not stored."""
        pid = int(Path(f"/run/libvirt/qemu/{self.domain}.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while self.dom.isActive():
            if time.monotonic() > deadline:
                raise TimeoutError("libvirt did not notice QEMU's death")
            time.sleep(0.05)

    def remove(self) -> None:
        """Stop and undefine the domain (idempotent). Should libvirt fail (libvirtd
        dead), its QEMU is ended by PID all the same (:class:`OwnedDomains`)."""
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self.stop()
            with contextlib.suppress(libvirt.libvirtError):
                self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None
        OWNED.reap(self.domain)

    def hmp(self, command: str) -> str:
        out: str = libvirt_qemu.qemuMonitorCommand(
            self.dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        return out

    def qmp(self, cmd: str) -> Any:
        """Ask QEMU directly through libvirt's passthrough (the test only)."""
        out = libvirt_qemu.qemuMonitorCommand(self.dom, json.dumps({"execute": cmd}), 0)
        return json.loads(out)["return"]

    def checkpoints(self, disk: str) -> dict[str, int]:
        """libvirt's checkpoints with a bitmap on *disk* -> its dirty bytes (-1: QEMU
        has no such bitmap)."""
        from blocktxn.agent.libvirt import domxml

        out = {}
        for c in self.dom.listAllCheckpoints(0):
            sizes = domxml.checkpoint_sizes(c.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE))
            if disk in sizes:
                size = sizes[disk]
                out[domxml.from_libvirt(c.getName())] = -1 if size is None else size
        return out

    def job_running(self) -> bool:
        return bool(self.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE)


class _DeviceWriter:
    """Writes to one disk through its guest device's block backend (see the module)."""

    def __init__(self, vm: LibvirtLabVm, disk: str) -> None:
        self.vm = vm
        self.device = f"/machine/peripheral/ua-{disk}/virtio-backend"

    def write(self, value: int, offset: int, length: int) -> None:
        out = self.vm.hmp(f'qemu-io -d {self.device} "write -P {value} {offset} {length}"')
        if out.strip():
            raise OSError(f"qemu-io write: {out.strip()}")

    def close(self) -> None:
        pass


class LibvirtWorkload(Workload):
    """The lab Workload, writing through the guest devices of a libvirt domain."""

    def attach(self) -> None:
        assert isinstance(self.vm, LibvirtLabVm)
        for d in self.vm.disks:
            self._io[d.name] = _DeviceWriter(self.vm, d.name)  # type: ignore[assignment]


class LibvirtHost(Host):
    """A lab host whose VMs are libvirt domains, served by one agent (--vm
    NAME=libvirt:DOMAIN). No stand-in guest agent: a domain without an OS has none
    (quiesce freeze is refused there; pause works)."""

    def __init__(self, workdir: Path, vms: dict[str, list[str]], *, agent_id: str = "host1",
                 raw: tuple[str, ...] = (), disk_size: int = 32 << 20,
                 extra: tuple[str, ...] = (),
                 images_fs: Callable[[Path], None] | None = None) -> None:
        """*images_fs* is called with the agent's future ``images`` directory before
        any domain starts (to mount a file system there that their QEMUs see)."""
        self.workdir = workdir
        if images_fs is not None:
            images_fs(workdir / "agent" / "repo" / "images")
        self.vms: dict[str, LabVm] = {}
        self.workloads: dict[str, Workload] = {}
        self.gas = {}
        argv = ["--libvirt-uri", URI, *extra]
        for name, disks in vms.items():
            vm = LibvirtLabVm.create_domain(name, workdir / name, disks, disk_size, raw)
            vm.start()
            self.vms[name] = vm
            wl = LibvirtWorkload(vm)
            wl.attach()
            self.workloads[name] = wl
            argv += ["--vm", f"{name}={LIBVIRT}{vm.domain}"]
        self.agent = AgentProcess(agent_id, workdir / "agent", [], {}, extra=argv)
        self.channel = None

    def domain(self, vm: str) -> LibvirtLabVm:
        found = self.vms[vm]
        assert isinstance(found, LibvirtLabVm)
        return found

    def close(self) -> None:
        try:
            self.agent.stop()
            if self.channel:
                self.channel.close()
        finally:
            for vm in self.vms:
                self.domain(vm).remove()

    def bitmaps(self, vm: str, disk: str) -> dict[str, dict[str, Any]]:
        """libvirt's checkpoints on *disk*, shaped like QEMU's bitmaps (libvirt's are
        always recording, and persistent)."""
        return {name: {"count": size, "recording": True}
                for name, size in self.domain(vm).checkpoints(disk).items()}

    def jobs(self, vm: str) -> list[dict[str, Any]]:
        return [{"status": "running"}] if self.domain(vm).job_running() else []
