"""The chaos cluster inside the lab namespaces: 3 etcd members, 2 coordinator
replicas, 3 agent hosts with 2 VMs each; every process started, killed,
stopped and restarted by PID.

On every host ``web`` is a qemu-storage-daemon with an extra large sparse disk
(``big``, BIG_SIZE virtual, almost nothing allocated) and ``db`` is a
qemu-system-x86_64 (``-M none``: no guest, but QMP ``stop``/``cont``, so it can be
quiesced with ``pause``); its STOP/RESUME events are recorded by a third monitor.
Every agent runs with ``BLOCKTXN_FAILPOINT_FILE`` (armed by the commit_fail fault).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blocktxn import procs
from blocktxn.demo.guest import Cut, StandInGuestAgent, Workload, close_guests
from blocktxn.demo.lab import AgentProcess, LabDisk, LabVm, qmp_call, wait_for_path
from tests.chaos.netlab import NetLab

ETCD = ("e1", "e2", "e3")
COORDS = ("c1", "c2")
HOSTS = ("h1", "h2", "h3")
VMS = ("web", "db")
DISKS = ("d0", "d1")
FAULTY_DISK = "d1"  # on every VM: blkdebug underneath, for injected read errors
DISK_SIZE = 8 << 20
BIG_DISK = "big"  # on every host's BIG_VM: a large sparse disk (large_disk fault)
BIG_VM = "web"
BIG_SIZE = 4 << 30
PAUSE_VM = "db"  # qemu-system-x86_64: can be paused (quiesce pause)
HAVE_QEMU_SYSTEM = shutil.which("qemu-system-x86_64") is not None
REPO_SIZE = 2 << 30  # tmpfs per agent repository (made full by the repo_full fault)
RETENTION = "chaos=keep-last=3"  # every set's group: each commit starts a prune
CLIENT = "cl"


@dataclass
class Proc:
    """A lab daemon: how to start it again, and its current process."""

    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    stopped: bool = False

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"))
        self.stopped = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, sig)
            self.stopped = sig == signal.SIGSTOP

    def kill(self) -> None:
        procs.kill(self.proc)
        self.stopped = False

    def terminate(self) -> None:
        procs.terminate(self.proc)


def _blockdev_args(vm: LabVm) -> list[str]:
    """The same node graph as LabVm.start (blkdebug under the faulty disk)."""
    argv: list[str] = []
    for d in vm.disks:
        if d.read_error:
            proto: dict[str, Any] = {
                "driver": "blkdebug", "node-name": f"{d.name}-dbg", "align": 4096,
                "image": {"driver": "file", "filename": str(d.image)},
                "set-state": [{"event": "pwritev_rmw_tail", "state": 1, "new_state": 2},
                              {"event": "read_aio", "state": 2, "new_state": 3}],
                "inject-error": [{"event": "read_aio", "state": 2, "errno": 5,
                                  "iotype": "read", "once": True, "immediately": False}],
            }
            argv += ["-blockdev", json.dumps(proto)]
            file_node = f"{d.name}-dbg"
        else:
            argv += ["-blockdev", f"driver=file,node-name={d.name}-file,filename={d.image}"]
            file_node = f"{d.name}-file"
        argv += ["-blockdev", f"driver=qcow2,node-name={d.name},file={file_node}"]
    return argv


class PausableVm(LabVm):
    """A qemu-system-x86_64 without a machine (``-M none``): the same disks and NBD
    exports as a LabVm, plus a real run state (QMP stop/cont/query-status), a monitor
    for the agent's freeze watchdog and one whose STOP/RESUME events are recorded
    (``pauses``)."""

    events: list[tuple[str, float]]
    _listener: threading.Thread | None = None

    @property
    def events_socket(self) -> Path:
        return self.workdir / "qmp-events.sock"

    @property
    def watch_socket(self) -> Path:
        """The monitor of the agent's freeze watchdog (AgentProcess passes it as
        ``--vm NAME=QMP,...,watch=PATH``)."""
        return self.workdir / "qmp-watch.sock"

    def start(self) -> None:
        monitors = (self.qmp_socket, self.probe_socket, self.watch_socket, self.events_socket)
        for sock in (*monitors, self.nbd_socket):
            sock.unlink(missing_ok=True)
        argv = ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
                *_blockdev_args(self)]
        for i, sock in enumerate(monitors):
            argv += ["-chardev", f"socket,path={sock},server=on,wait=off,id=qmp{i}",
                     "-mon", f"chardev=qmp{i},mode=control"]
        self.proc = subprocess.Popen([*self.prefix, *argv], stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / "qemu.log", "ab"))
        wait_for_path(self.probe_socket)
        wait_for_path(self.events_socket)
        self._export()
        wait_for_path(self.nbd_socket)
        if not hasattr(self, "events"):
            self.events = []
        if self._listener is None or not self._listener.is_alive():
            self._listener = threading.Thread(target=self._listen, daemon=True,
                                              name=f"events-{self.name}")
            self._listener.start()

    def _export(self) -> None:
        """NBD server and exports over the probe monitor. Retried: once (seed 5, under
        load) block-export-add right after nbd-server-start said "NBD server not running"."""
        exported: set[str] = set()
        for attempt in range(10):
            try:
                try:
                    qmp_call(self.probe_socket, "nbd-server-start",
                             {"addr": {"type": "unix", "data": {"path": str(self.nbd_socket)}}})
                except RuntimeError as err:
                    if "already" not in str(err):
                        raise
                for d in self.disks:
                    if d.name not in exported:
                        qmp_call(self.probe_socket, "block-export-add",
                                 {"type": "nbd", "id": f"exp-{d.name}", "node-name": d.name,
                                  "name": d.name, "writable": True})
                        exported.add(d.name)
                return
            except (RuntimeError, OSError):
                if attempt == 9:
                    raise
                time.sleep(0.2)

    def _listen(self) -> None:
        """Record STOP/RESUME (QEMU's own timestamps); reconnect after a restart."""
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.events_socket))
                    f = s.makefile("rwb")
                    f.readline()
                    f.write(b'{"execute": "qmp_capabilities"}\n')
                    f.flush()
                    for line in f:
                        msg = json.loads(line)
                        if msg.get("event") in ("STOP", "RESUME"):
                            ts = msg["timestamp"]
                            self.events.append(
                                (msg["event"], ts["seconds"] + ts["microseconds"] / 1e6))
            except (OSError, ValueError):
                pass
            time.sleep(0.05)

    def pauses(self, since: float = 0.0) -> list[tuple[float, float | None]]:
        """(paused at, resumed at or None) for every pause that began after *since*."""
        out: list[tuple[float, float | None]] = []
        for name, t in list(self.events):
            if name == "STOP":
                out.append((t, None))
            elif out and out[-1][1] is None:
                out[-1] = (out[-1][0], t)
        return [p for p in out if p[0] >= since]

    def status(self) -> str:
        return str(qmp_call(self.probe_socket, "query-status")["status"])


@dataclass
class ChaosWorkload(Workload):
    """A Workload whose cut snapshots copy sparse shadows sparsely (a 4 GiB disk)."""

    def snapshot(self, tag: str) -> Cut:
        images = {}
        for disk, shadow in self.shadows.items():
            dst = self.vm.workdir / f"{disk}.cut-{tag}.raw"
            sparse_copy(shadow, dst)
            images[disk] = dst
        return Cut(self.seq, images, time.time())


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy only the data extents of *src* (holes stay holes)."""
    size = src.stat().st_size
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            fi.seek(start)
            fo.seek(start)
            left = end - start
            while left > 0:
                chunk = fi.read(min(left, 8 << 20))
                if not chunk:
                    break
                fo.write(chunk)
                left -= len(chunk)
            pos = end


@dataclass
class Host:
    name: str
    vms: dict[str, LabVm] = field(default_factory=dict)
    workloads: dict[str, Workload] = field(default_factory=dict)
    gas: dict[str, StandInGuestAgent] = field(default_factory=dict)
    agent: AgentProcess | None = None
    repo: Path = Path()
    failpoints: Path = Path()  # the agent's BLOCKTXN_FAILPOINT_FILE


class ChaosCluster:
    def __init__(self, net: NetLab, workdir: Path) -> None:
        self.net = net
        self.workdir = workdir
        self.etcd: dict[str, Proc] = {}
        self.coords: dict[str, Proc] = {}
        self.hosts: dict[str, Host] = {}

    @property
    def etcd_endpoints(self) -> str:
        return ",".join(f"{self.net.addr(e)}:2379" for e in ETCD)

    @property
    def coordinator_addresses(self) -> list[str]:
        return [f"{self.net.addr(c)}:7400" for c in COORDS]

    def start(self) -> None:
        peers = ",".join(f"{e}=http://{self.net.addr(e)}:2380" for e in ETCD)
        for e in ETCD:
            ip = self.net.addr(e)
            d = self.workdir / e
            d.mkdir(parents=True, exist_ok=True)
            p = Proc(e, [*self.net.exec_prefix(e), "etcd", "--name", e, "--data-dir",
                         str(d / "data"), "--listen-client-urls", f"http://{ip}:2379",
                         "--advertise-client-urls", f"http://{ip}:2379",
                         "--listen-peer-urls", f"http://{ip}:2380",
                         "--initial-advertise-peer-urls", f"http://{ip}:2380",
                         "--initial-cluster", peers, "--initial-cluster-state", "new",
                         "--heartbeat-interval", "100", "--election-timeout", "1000"],
                     d / "etcd.log")
            p.start()
            self.etcd[e] = p
        for c in COORDS:
            ip = self.net.addr(c)
            d = self.workdir / c
            d.mkdir(parents=True, exist_ok=True)
            p = Proc(c, [*self.net.exec_prefix(c), sys.executable, "-m", "blocktxn.coordinator",
                         "--name", c, "--listen", f"{ip}:7400", "--etcd", self.etcd_endpoints,
                         "--data-dir", str(d), "--retention", RETENTION, "--insecure"],
                     d / "coordinator.log")
            p.start()
            self.coords[c] = p
        for h in HOSTS:
            host = Host(h, repo=self.workdir / h / "agent" / "repo",
                        failpoints=self.workdir / h / "failpoints")
            for v in VMS:
                vm = LabVm.create(v, self.workdir / h / v, list(DISKS), size=DISK_SIZE,
                                  read_error_disks=(FAULTY_DISK,))
                if v == PAUSE_VM and HAVE_QEMU_SYSTEM:
                    vm = PausableVm(vm.name, vm.workdir, vm.disks)
                if v == BIG_VM:
                    big = vm.workdir / f"{BIG_DISK}.qcow2"
                    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(big),
                                    str(BIG_SIZE)], check=True)
                    vm.disks.append(LabDisk(BIG_DISK, big, BIG_SIZE))
                vm.prefix = self.net.exec_prefix(h)
                vm.start()
                wl = ChaosWorkload(vm)
                wl.attach()
                for d_ in DISKS:
                    wl.write(d_, 0)  # cluster 0: where read errors are armed
                host.vms[v], host.workloads[v] = vm, wl
                host.gas[v] = StandInGuestAgent(self.workdir / h / v / "ga.sock", wl)
            host.agent = AgentProcess(
                h, self.workdir / h / "agent", list(host.vms.values()),
                {v: g.path for v, g in host.gas.items()},
                extra=["--coordinator", ",".join(self.coordinator_addresses), "--insecure"],
                host_ip=self.net.addr(h), prefix=self.net.exec_prefix(h),
                env={"BLOCKTXN_FAILPOINT_FILE": str(host.failpoints)})
            host.agent.start()
            self.hosts[h] = host

    def restart_vm(self, host: str, vm: str) -> None:
        """After a QEMU kill: resync the shadows from the crashed images, restart."""
        h = self.hosts[host]
        lab_vm, wl = h.vms[vm], h.workloads[vm]
        with wl.lock:
            wl.detach()
            for d in lab_vm.disks:
                subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw",
                                str(d.image), str(wl.shadows[d.name])], check=True)
            lab_vm.start()
            wl.attach()

    def pausable(self, host: str) -> PausableVm | None:
        vm = self.hosts[host].vms.get(PAUSE_VM)
        return vm if isinstance(vm, PausableVm) else None

    def stop_all(self) -> None:
        for h in self.hosts.values():
            if h.agent is not None:
                h.agent.stop()
            close_guests(h.gas.values(), h.workloads.values(), h.vms.values())
        for p in [*self.coords.values(), *self.etcd.values()]:
            p.terminate()

    def wait_ready(self, timeout: float = 60) -> None:
        from blocktxn.client import SyncClient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for address in self.coordinator_addresses:
                try:
                    agents = SyncClient(address, timeout=3).agents()
                    if sum(1 for a in agents if a.live and a.inventory.vms) == len(HOSTS):
                        return
                except Exception:  # not up yet
                    pass
            time.sleep(0.5)
        raise TimeoutError("chaos cluster did not come up")
