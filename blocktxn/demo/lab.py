"""A lab of real QEMU VMs for tests and the demo (never used by the daemons).

``LabVm`` is one qemu-storage-daemon with qcow2 disks exported over NBD and a
QMP socket; ``AgentProcess`` a `blocktxn agent` serving some of them; and the
image and QMP helpers the checks use. What runs "inside" a VM (its writes and its
guest agent) is in ``guest.py``.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blocktxn import procs

CLUSTER = 64 * 1024


def wait_for_path(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.02)


@dataclass
class LabDisk:
    name: str
    image: Path
    size: int
    read_error: bool = False  # blkdebug under the qcow2: one read fails once armed


@dataclass
class LabVm:
    """One qemu-storage-daemon with its disks exported over NBD; or, with *system*, a
    ``qemu-system-x86_64 -machine none`` (no guest, but QMP ``stop``/``cont``: quiesce
    ``pause``) with the same disks and exports, and a third monitor for the agent's
    freeze watchdog."""

    name: str
    workdir: Path
    disks: list[LabDisk]
    proc: subprocess.Popen[bytes] | None = None
    prefix: list[str] = field(default_factory=list)  # e.g. ip netns exec NS
    system: bool = False

    @classmethod
    def create(cls, name: str, workdir: Path, disk_names: list[str], size: int = 32 << 20,
               read_error_disks: tuple[str, ...] = (), system: bool = False) -> LabVm:
        workdir.mkdir(parents=True, exist_ok=True)
        disks = []
        for d in disk_names:
            image = workdir / f"{d}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)],
                           check=True)
            disks.append(LabDisk(d, image, size, d in read_error_disks))
        return cls(name, workdir, disks, system=system)

    @property
    def qmp_socket(self) -> Path:
        return self.workdir / "qmp.sock"

    @property
    def probe_socket(self) -> Path:
        return self.workdir / "qmp-probe.sock"

    @property
    def watch_socket(self) -> Path | None:
        """The monitor the agent's freeze watchdog uses (system VMs only)."""
        return self.workdir / "qmp-watch.sock" if self.system else None

    @property
    def nbd_socket(self) -> Path:
        return self.workdir / "nbd.sock"

    def nbd_uri(self, disk: str) -> str:
        return f"nbd+unix:///{disk}?socket={self.nbd_socket}"

    def start(self) -> None:
        for sock in (self.qmp_socket, self.probe_socket, self.nbd_socket, self.watch_socket):
            if sock is not None:
                sock.unlink(missing_ok=True)
        argv = (["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none"]
                if self.system else ["qemu-storage-daemon"])
        for d in self.disks:
            if d.read_error:
                proto: dict[str, Any] = {
                    "driver": "blkdebug", "node-name": f"{d.name}-dbg", "align": 4096,
                    "image": {"driver": "file", "filename": str(d.image)},
                    # A sub-4k write (read-modify-write) arms the error (see
                    # Workload.arm_read_error).
                    "set-state": [{"event": "pwritev_rmw_tail", "state": 1, "new_state": 2},
                                  {"event": "read_aio", "state": 2, "new_state": 3}],
                    # armed (state 2), the next data read fails with EIO, once: a
                    # transient error that fails the backup job reading it
                    "inject-error": [{"event": "read_aio", "state": 2, "errno": 5,
                                      "iotype": "read", "once": True,
                                      "immediately": False}],
                }
                argv += ["--blockdev", json.dumps(proto)]
                file_node = f"{d.name}-dbg"
            else:
                argv += ["--blockdev",
                         f"driver=file,node-name={d.name}-file,filename={d.image}"]
                file_node = f"{d.name}-file"
            argv += ["--blockdev", f"driver=qcow2,node-name={d.name},file={file_node}"]
        if not self.system:
            argv += ["--nbd-server", f"addr.type=unix,addr.path={self.nbd_socket}"]
            for d in self.disks:
                argv += ["--export",
                         f"type=nbd,id=exp-{d.name},node-name={d.name},name={d.name},writable=on"]
        # the agent's monitor; a second one for tests and the demo to look at QEMU
        # directly; a system VM's third is the agent's freeze watchdog's
        monitors = [self.qmp_socket, self.probe_socket]
        if self.watch_socket is not None:
            monitors.append(self.watch_socket)
        for i, sock in enumerate(monitors):
            argv += ["--chardev", f"socket,path={sock},server=on,wait=off,id=qmp{i}",
                     "-mon" if self.system else "--monitor",
                     f"chardev=qmp{i}{',mode=control' if self.system else ''}"]
        self.proc = subprocess.Popen([*self.prefix, *argv], stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / "qsd.log", "ab"))
        wait_for_path(self.qmp_socket)
        if self.system:  # no command-line exports: start them over the probe monitor
            wait_for_path(self.probe_socket)
            qmp_call(self.probe_socket, "nbd-server-start",
                     {"addr": {"type": "unix", "data": {"path": str(self.nbd_socket)}}})
            for d in self.disks:
                qmp_call(self.probe_socket, "block-export-add", {
                    "type": "nbd", "id": f"exp-{d.name}", "node-name": d.name,
                    "name": d.name, "writable": True})
        wait_for_path(self.nbd_socket)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: unstored bitmaps are lost, stored ones come back inconsistent."""
        procs.kill(self.proc)

    def stop(self) -> None:
        """Clean shutdown: persistent bitmaps are written to the qcow2 files."""
        procs.terminate(self.proc)


#: Ports this process has handed out (never twice).
_HANDED_OUT: set[int] = set()
#: free_port's ports start here (below them: well-known services' usual ports).
PORTS_FROM = 10000


def _ephemeral_start() -> int:
    """The lowest port the kernel gives a bind to port 0 or an outgoing connection."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port free now, for a daemon that binds it a little later. It is taken
    below the kernel's ephemeral range, where no port-0 bind and no outgoing
    connection's source port can take it meanwhile, and never handed out twice by
    this process (a port picked with bind(0) and closed could be given to the next
    bind(0) anyone makes, or become a connection's source port, before its daemon
    binds it)."""
    top = _ephemeral_start()
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(PORTS_FROM, top) if top > PORTS_FROM + 1000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        if port in _HANDED_OUT:
            continue
        _HANDED_OUT.add(port)
        return port
    raise OSError("no free loopback port found")


def qemu_img_map(image: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", str(image)],
                         check=True, capture_output=True, text=True).stdout
    result: list[dict[str, Any]] = json.loads(out)
    return result


def top_layer_clusters(image: Path) -> set[int]:
    """Clusters an image itself holds (not inherited from its backing chain)."""
    clusters: set[int] = set()
    for ext in qemu_img_map(image):
        if ext["depth"] == 0 and (ext["data"] or ext.get("zero")) and ext.get("present", True):
            start, length = ext["start"], ext["length"]
            clusters.update(range(start // CLUSTER, (start + length) // CLUSTER))
    return clusters


def images_equal(a: Path, fmt_a: str, b: Path, fmt_b: str) -> bool:
    res = subprocess.run(["qemu-img", "compare", "-q", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],
                         capture_output=True)
    return res.returncode == 0


class AgentProcess:
    """A `blocktxn agent` subprocess serving the VMs of one lab host."""

    def __init__(self, agent_id: str, workdir: Path, vms: list[LabVm],
                 guest_agents: dict[str, Path], extra: list[str] | None = None,
                 host_ip: str = "127.0.0.1", prefix: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.agent_id = agent_id
        self.workdir = workdir
        self.repo = workdir / "repo"
        self.restore_dir = workdir / "restores"
        self.vms = vms
        self.guest_agents = guest_agents
        self.extra = extra or []
        self.host_ip = host_ip
        self.prefix = prefix or []
        self.env = env
        self.port = free_port() if host_ip == "127.0.0.1" else 7401
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host_ip}:{self.port}"

    def argv(self) -> list[str]:
        import sys

        argv = [sys.executable, "-m", "blocktxn.agent", "--id", self.agent_id,
                "--listen", self.address, "--repo", str(self.repo),
                "--restore-dir", str(self.restore_dir)]
        for vm in self.vms:
            spec = f"{vm.name}={vm.qmp_socket}"
            if vm.name in self.guest_agents:
                spec += f",ga={self.guest_agents[vm.name]}"
            if vm.watch_socket is not None:
                spec += f",watch={vm.watch_socket}"
            argv += ["--vm", spec]
        return argv + self.extra

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([*self.prefix, *self.argv()], stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / "agent.log", "ab"),
                                     env={**os.environ, **self.env} if self.env else None)

    def kill(self) -> None:
        procs.kill(self.proc)

    def stop(self) -> None:
        procs.terminate(self.proc)


def qmp_call(socket_path: Path, cmd: str, args: dict[str, Any] | None = None) -> Any:
    """One QMP command over a fresh connection (blocking, with a deadline)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(socket_path))
        f = s.makefile("rwb")
        f.readline()  # greeting
        for msg in ({"execute": "qmp_capabilities"},
                    {"execute": cmd, **({"arguments": args} if args else {})}):
            f.write(json.dumps(msg).encode() + b"\n")
            f.flush()
            while True:
                line = f.readline()
                if not line:
                    raise OSError("QMP closed")
                reply = json.loads(line)
                if "event" in reply:
                    continue
                if "error" in reply:
                    raise RuntimeError(reply["error"]["desc"])
                break
        return reply["return"]


def dirty_counts(vm: LabVm, disk: str) -> dict[str, int]:
    """Named dirty bitmaps of *disk* and their dirty byte counts (probe monitor)."""
    for n in qmp_call(vm.probe_socket, "query-named-block-nodes", {"flat": True}):
        if n["node-name"] == disk:
            return {b["name"]: int(b["count"]) for b in n.get("dirty-bitmaps", []) if "name" in b}
    raise KeyError(disk)
