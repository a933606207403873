"""What runs inside a lab VM (tests and the demo, never the daemons).

``Workload`` writes whole clusters through long-lived ``qemu-io`` processes attached
to the VM's NBD exports, mirrors every write into a raw shadow file, and records
which clusters it wrote, in order. ``StandInGuestAgent`` speaks the qemu-ga freeze
protocol for a VM: freezing really stops the workload's writes and snapshots the
shadows, which is then the VM's exact content at the cut.
"""

from __future__ import annotations

import json
import random
import shutil
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blocktxn.demo.lab import CLUSTER, LabVm


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
