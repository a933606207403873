"""A lab of real QEMU VMs for tests and the demo (never used by the daemons).

``LabVm`` is one qemu-storage-daemon with qcow2 disks exported over NBD and a
QMP socket. ``Workload`` writes whole clusters through long-lived ``qemu-io``
processes attached to those exports, mirrors every write into a raw shadow
file, and records which clusters it wrote, in order. ``StandInGuestAgent``
speaks the qemu-ga freeze protocol for a VM: freezing really stops the
workload's writes and snapshots the shadows, which is then the VM's exact
content at the cut.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterable
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
    """One qemu-storage-daemon with its disks exported over NBD."""

    name: str
    workdir: Path
    disks: list[LabDisk]
    proc: subprocess.Popen[bytes] | None = None
    prefix: list[str] = field(default_factory=list)  # e.g. ip netns exec NS

    @classmethod
    def create(cls, name: str, workdir: Path, disk_names: list[str], size: int = 32 << 20,
               read_error_disks: tuple[str, ...] = ()) -> LabVm:
        workdir.mkdir(parents=True, exist_ok=True)
        disks = []
        for d in disk_names:
            image = workdir / f"{d}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)],
                           check=True)
            disks.append(LabDisk(d, image, size, d in read_error_disks))
        return cls(name, workdir, disks)

    @property
    def qmp_socket(self) -> Path:
        return self.workdir / "qmp.sock"

    @property
    def probe_socket(self) -> Path:
        return self.workdir / "qmp-probe.sock"

    @property
    def nbd_socket(self) -> Path:
        return self.workdir / "nbd.sock"

    def nbd_uri(self, disk: str) -> str:
        return f"nbd+unix:///{disk}?socket={self.nbd_socket}"

    def start(self) -> None:
        for sock in (self.qmp_socket, self.probe_socket, self.nbd_socket):
            sock.unlink(missing_ok=True)
        argv = ["qemu-storage-daemon"]
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
        argv += ["--nbd-server", f"addr.type=unix,addr.path={self.nbd_socket}"]
        for d in self.disks:
            argv += ["--export",
                     f"type=nbd,id=exp-{d.name},node-name={d.name},name={d.name},writable=on"]
        argv += ["--chardev", f"socket,path={self.qmp_socket},server=on,wait=off,id=qmp0",
                 "--monitor", "chardev=qmp0",
                 # a second monitor, for tests and the demo to look at QEMU directly
                 "--chardev", f"socket,path={self.probe_socket},server=on,wait=off,id=qmp1",
                 "--monitor", "chardev=qmp1"]
        self.proc = subprocess.Popen([*self.prefix, *argv], stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / "qsd.log", "ab"))
        wait_for_path(self.qmp_socket)
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


class QemuIo:
    """A long-lived interactive qemu-io attached to one NBD export."""

    def __init__(self, uri: str) -> None:
        self.proc = subprocess.Popen(
            ["stdbuf", "-oL", "qemu-io", "-f", "raw", uri],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def write(self, value: int, offset: int, length: int) -> None:
        """One write, acknowledged by QEMU when this returns. Raises: OSError."""
        assert self.proc.stdin and self.proc.stdout
        # qemu-io handles one line per wake-up of its stdin: one command at a time.
        self.proc.stdin.write(f"write -P {value} {offset} {length}\n".encode())
        self.proc.stdin.flush()
        while True:
            raw = self.proc.stdout.readline()
            if not raw:
                raise OSError("qemu-io exited")
            text = raw.decode(errors="replace")
            if "failed" in text or "error" in text.lower():
                raise OSError(f"qemu-io write: {text.strip()}")
            if "ops;" in text:
                return

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin
            try:
                self.proc.stdin.close()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Cut:
    """What the stand-in guest agent saw at one freeze."""

    seq: int                       # number of writes acknowledged before the freeze
    images: dict[str, Path]        # disk -> snapshot of the shadow (exact cut content)
    at: float


@dataclass
class Workload:
    """Writes whole clusters to a VM's disks and remembers every one of them."""

    vm: LabVm
    shadows: dict[str, Path] = field(default_factory=dict)
    log: list[tuple[int, str, int, int]] = field(default_factory=list)  # seq, disk, cluster, byte
    lock: threading.Lock = field(default_factory=threading.Lock)
    frozen: threading.Event = field(default_factory=threading.Event)
    _io: dict[str, QemuIo] = field(default_factory=dict)
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    writes_while_frozen: int = 0

    def __post_init__(self) -> None:
        for d in self.vm.disks:
            shadow = self.vm.workdir / f"{d.name}.shadow.raw"
            if not shadow.exists():
                with open(shadow, "wb") as f:
                    f.truncate(d.size)
            self.shadows[d.name] = shadow

    def attach(self) -> None:
        for d in self.vm.disks:
            self._io[d.name] = QemuIo(self.vm.nbd_uri(d.name))

    def detach(self) -> None:
        for io in self._io.values():
            io.close()
        self._io.clear()

    @property
    def seq(self) -> int:
        return len(self.log)

    def write(self, disk: str, cluster: int, byte: int | None = None) -> None:
        """Write one whole cluster (a non-zero pattern) and record it."""
        with self.lock:
            self._write_locked(disk, cluster, byte)

    def _write_locked(self, disk: str, cluster: int, byte: int | None) -> None:
        if self.frozen.is_set():
            self.writes_while_frozen += 1
        value = byte if byte is not None else random.randrange(1, 256)
        self._io[disk].write(value, cluster * CLUSTER, CLUSTER)
        with open(self.shadows[disk], "r+b") as f:
            f.seek(cluster * CLUSTER)
            f.write(bytes([value]) * CLUSTER)
        self.log.append((len(self.log) + 1, disk, cluster, value))

    def arm_read_error(self, disk: str, cluster: int) -> None:
        """Make the next data read of *disk* fail with EIO (a disk made with read_error).

        A 512-byte write at 4 KiB inside the already written *cluster* is a
        read-modify-write of its tail for blkdebug's 4k alignment, which arms it.
        """
        self._small_write(disk, cluster, 4096)

    def _small_write(self, disk: str, cluster: int, offset: int) -> None:
        with self.lock:
            value = random.randrange(1, 256)
            self._io[disk].write(value, cluster * CLUSTER + offset, 512)
            with open(self.shadows[disk], "r+b") as f:
                f.seek(cluster * CLUSTER + offset)
                f.write(bytes([value]) * 512)
            self.log.append((len(self.log) + 1, disk, cluster, value))

    def clusters(self, disk: str, after_seq: int, upto_seq: int | None = None) -> set[int]:
        """Clusters of *disk* written by writes number after_seq+1 .. upto_seq."""
        end = self.seq if upto_seq is None else upto_seq
        return {c for s, d, c, _ in self.log if d == disk and after_seq < s <= end}

    def snapshot(self, tag: str) -> Cut:
        """Copy the shadows (call with the writes stopped)."""
        images = {}
        for disk, shadow in self.shadows.items():
            dst = self.vm.workdir / f"{disk}.cut-{tag}.raw"
            shutil.copyfile(shadow, dst)
            images[disk] = dst
        return Cut(self.seq, images, time.time())

    def start_background(self, interval: float = 0.01, seed: int = 0) -> None:
        """Write random clusters of random disks until stop_background()."""
        rng = random.Random(seed)
        names = [d.name for d in self.vm.disks]
        nclusters = self.vm.disks[0].size // CLUSTER

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.write(rng.choice(names), rng.randrange(nclusters))
                except OSError:
                    return  # the VM went away
                time.sleep(interval)

        self._stop.clear()
        self._thread = threading.Thread(target=loop, name=f"workload-{self.vm.name}", daemon=True)
        self._thread.start()

    def stop_background(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
            self._thread = None


class StandInGuestAgent:
    """A qemu-ga stand-in: guest-sync, guest-fsfreeze-{freeze,thaw,status}.

    Freeze takes the workload's write lock (waiting for the write in flight),
    so no write happens until thaw, and snapshots the shadows: ``cuts`` holds
    the exact content of every disk at each freeze.
    """

    def __init__(self, path: Path, workload: Workload) -> None:
        self.path = path
        self.workload = workload
        self.cuts: list[Cut] = []
        self.frozen_intervals: list[tuple[float, float]] = []
        self.answer_freeze = True  # False: a guest agent that never answers freeze
        self.fail_thaws = 0  # the next N thaws answer with an error (and stay frozen)
        self.freeze_delay = 0.0  # seconds a freeze takes before it answers
        self._frozen_since: float | None = None
        self._mutex = threading.Lock()
        path.unlink(missing_ok=True)
        agent = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    self._serve()
                except OSError:
                    return  # the client went away (a killed agent, a timed-out call)

            def _serve(self) -> None:
                for line in self.rfile:
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    reply = agent._dispatch(msg)
                    if reply is None:
                        return
                    try:
                        self.wfile.write(json.dumps(reply).encode() + b"\n")
                        self.wfile.flush()
                    except OSError:
                        return  # the client gave up waiting (a timed-out call)

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self._server = Server(str(path), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def is_frozen(self) -> bool:
        return self._frozen_since is not None

    def _dispatch(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        cmd = msg.get("execute")
        if cmd == "guest-sync":
            return {"return": msg.get("arguments", {}).get("id")}
        if cmd == "guest-fsfreeze-status":
            return {"return": "frozen" if self.is_frozen else "thawed"}
        if cmd == "guest-fsfreeze-freeze":
            if not self.answer_freeze:
                time.sleep(3600)
                return None
            time.sleep(self.freeze_delay)
            with self._mutex:
                if not self.is_frozen:
                    self.workload.lock.acquire()
                    self.workload.frozen.set()
                    self._frozen_since = time.time()
                    self.cuts.append(self.workload.snapshot(str(len(self.cuts))))
            return {"return": len(self.workload.vm.disks)}
        if cmd == "guest-fsfreeze-thaw":
            with self._mutex:
                if self.fail_thaws > 0:
                    self.fail_thaws -= 1
                    return {"error": {"class": "GenericError", "desc": "thaw failed (test)"}}
                if self._frozen_since is not None:
                    self.frozen_intervals.append((self._frozen_since, time.time()))
                    self._frozen_since = None
                    self.workload.frozen.clear()
                    self.workload.lock.release()
            return {"return": len(self.workload.vm.disks)}
        return {"error": {"class": "CommandNotFound", "desc": f"command {cmd} not found"}}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._mutex:
            if self._frozen_since is not None:
                self._frozen_since = None
                self.workload.frozen.clear()
                self.workload.lock.release()


def close_guests(gas: Iterable[StandInGuestAgent], workloads: Iterable[Workload],
                 vms: Iterable[LabVm]) -> None:
    """Stop writers and guest agents, detach, then shut the VMs down cleanly."""
    workloads = list(workloads)
    for wl in workloads:
        wl.stop_background()
    for ga in gas:
        ga.close()
    for wl in workloads:
        wl.detach()
    for vm in vms:
        vm.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
