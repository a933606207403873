"""The chaos driver (runs inside the client namespace): back-to-back grouped
transactions, writers running all the time, one seeded fault per transaction at
a chosen protocol step, a recorded history, and the invariant checker.

Fault kinds (each at a step in STEPS unless it acts on the cut itself):

- process faults: kill/stop of the leader coordinator, an agent, an etcd member;
  SIGTERM and power loss (torn journal/catalog tail) of an agent; kill of a VM;
- network: a partition of an agent host (``partition``) or of an etcd member
  (``etcd_cut``: its bridge port goes down, the process keeps running);
- resources: repository full, guest agent that never answers freeze, read error;
- ``pause_kill_agent`` / ``pause_stop_agent``: a transaction quiesced with QMP
  ``stop``/``cont`` (quiesce ``pause``, on the qemu-system VMs) whose agent is
  SIGKILLed (kept down past the freeze deadline) or SIGSTOPped for longer than the
  freeze timeout; at step ``cut`` the fault fires the moment QEMU reports STOP;
- ``concurrent``: transaction A (every VM's d0, freeze) and B (every VM's d1,
  freeze or none) at the same time (B starts when A reaches the step);
- ``large_disk``: the transaction also holds every host's 4 GiB sparse disk, and
  the agent of one host is killed at the step;
- ``commit_fail``: one agent's Commit answers FAILED_PRECONDITION (runtime
  failpoint ``agent_commit=fail``) from the step until 3 s after the decision;
- ``prune_crash``: retention runs all the time (group ``chaos``, keep-last 3: every
  commit starts a prune that overlaps the next transactions and their faults); this
  fault makes one agent exit (power-loss style) inside a set removal, right after its
  ``rebase`` of the child image or its ``delete`` of the file (runtime failpoints
  ``agent_after_rebase`` / ``agent_after_delete``); the agent is started again.

Retention invariants: after every transaction, every listed set is whole in the
agents' catalogs and files; at the end (after a last prune), every set still listed
restores to the content recorded when it committed, and every set retention removed
is gone from every catalog and repository.

Point in time is checked against the stand-in guest agent's snapshot at the
freeze when one transaction alone froze the VMs, otherwise by reconstruction:
the restored disks must equal the writer's history replayed up to one write
number k, and the instant k stands for must lie inside the VM's pause (QEMU's
STOP/RESUME timestamps), be one of the freezes, or (quiesce none) inside the
transaction's lifetime.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blocktxn.client import BackupOptions, Client, ClientError, SyncClient
from blocktxn.coordinator.errors import StoreUnavailableError
from blocktxn.coordinator.store import leader_name
from blocktxn.demo.lab import CLUSTER, dirty_counts, images_equal, qmp_call, top_layer_clusters
from blocktxn.v1 import coordinator_pb2 as cpb
from tests.chaos.cluster import (
    BIG_DISK,
    BIG_SIZE,
    BIG_VM,
    DISK_SIZE,
    DISKS,
    ETCD,
    FAULTY_DISK,
    HAVE_QEMU_SYSTEM,
    HOSTS,
    PAUSE_VM,
    REPO_SIZE,
    VMS,
    ChaosCluster,
    PausableVm,
)

PAUSE_FAULTS = ("pause_kill_agent", "pause_stop_agent")
ALL_FAULTS = ("none", "kill_leader", "stop_leader", "kill_agent", "stop_agent", "kill_etcd",
              "stop_etcd", "partition", "io_error", "kill_vm", "repo_full", "ga_silent",
              "power_loss", "term_agent", *PAUSE_FAULTS, "concurrent", "etcd_cut",
              "large_disk", "commit_fail", "prune_crash")
FAULTS = tuple(f for f in ALL_FAULTS if HAVE_QEMU_SYSTEM or f not in PAUSE_FAULTS)
CUT_ONLY = ("repo_full", "ga_silent", "io_error")  # act on what the cut is about to do
PRUNE_STEPS = ("rebase", "delete")  # where prune_crash stops an agent inside a removal
GROUP = "chaos"  # the retention group of every set (the coordinators keep the last 3)
STEPS = ("cut", "run", "barrier", "decided")
FREEZE_TIMEOUT = 4.0
FREEZE_LIMIT = FREEZE_TIMEOUT + 2.5  # bounded freeze: longest acceptable quiesce
DEADLINE = 25.0
STOP_FOR = 6.0  # SIGSTOP of an agent: longer than the freeze timeout (the watchdog thaws)
# an agent whose VM is paused is killed or stopped for clearly longer than the bound
KILL_FOR = FREEZE_LIMIT + 1.0
PAUSE_STOP_FOR = FREEZE_LIMIT + 2.0
THROTTLE = 2 << 20  # bytes/s per job when the fault targets run or barrier
BIG_WRITE_EVERY = 25  # one write in this many on a BIG_VM goes to its big disk

Key = tuple[str, str]  # host, vm
Member = tuple[str, str, str]  # host, vm, disk


def tear_tail(path: Path, rng: random.Random) -> None:
    """Append a prefix of the file's last record: a write that power loss cut short."""
    if not path.exists():
        return
    lines = path.read_bytes().splitlines()
    if lines:
        last = lines[-1]
        with open(path, "ab") as f:
            f.write(last[: rng.randrange(1, len(last))])


def cluster_reps(path: Path) -> list[Any]:
    """Per cluster: its byte if the cluster is uniform, else a digest of its bytes."""
    reps: list[Any] = []
    with open(path, "rb") as f:
        while True:
            cl = f.read(CLUSTER)
            if not cl:
                return reps
            reps.append(cl[0] if cl.count(cl[0]) == len(cl) else hashlib.blake2b(cl).digest())


@dataclass
class Base:
    """A VM's disks (as cluster reps) at write number *seq*: the start of a replay."""

    seq: int
    reps: dict[str, list[Any]]


@dataclass
class TxnRun:
    txn_id: str
    fault: str
    step: str
    cuts_before: dict[Key, int]
    members: list[Member] = field(default_factory=list)
    quiesce: str = "freeze"
    exclusive: bool = True  # no other transaction in flight: the freeze snapshot is its cut
    started: float = 0.0
    base: dict[Key, Base] = field(default_factory=dict)
    final: Any = None
    ended: float = 0.0

    @property
    def vms(self) -> list[Key]:
        return sorted({(h, v) for h, v, _ in self.members})

    def disks_of(self, key: Key) -> list[str]:
        return [d for h, v, d in self.members if (h, v) == key]


@dataclass
class History:
    runs: list[TxnRun] = field(default_factory=list)
    faults: Counter[tuple[str, str]] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    refused: int = 0  # concurrent transactions refused at the start (nothing changed)
    commit_refusals: int = 0  # transactions whose Commit was refused by the failpoint
    # per (host, vm, disk): workload seq of the last committed cut (the latest it can be),
    # None after a VM crash
    last_commit: dict[Member, int | None] = field(default_factory=dict)
    crashed: set[Key] = field(default_factory=set)
    writes: list[tuple[int, Key, int]] = field(default_factory=list)  # g, vm, seq
    # per VM: seq -> (issued, acknowledged) wall-clock times of the writer's writes
    wtimes: dict[Key, dict[int, tuple[float, float]]] = field(default_factory=dict)
    # per committed set: sha256 of each member's content, recorded when it was checked
    digests: dict[str, dict[Member, str]] = field(default_factory=dict)
    removed: int = 0  # sets retention removed, checked gone at the end


#: How long a run may go on past its duration to reach its minimum of transactions.
MAX_OVERRUN = 480.0


class Driver:
    def __init__(self, cluster: ChaosCluster, seed: int, duration: float, log: Any,
                 faults: tuple[str, ...] | None = None, min_transactions: int = 0) -> None:
        unknown = set(faults or ()) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown (or unavailable) fault kinds {sorted(unknown)}")
        self.faults = faults or FAULTS
        self.c = cluster
        self.rng = random.Random(seed)
        self.seed = seed
        self.duration = duration
        self.min_transactions = min_transactions
        self.h = History()
        self.log = log
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._dead: set[Key] = set()
        self.stuck = False
        self.vm_pool = ThreadPoolExecutor(3, thread_name_prefix="chk-vm")
        self.pool = ThreadPoolExecutor(6, thread_name_prefix="chk-disk")
        self.pending_crashes: list[Key] = []
        self._prune_seen: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._clients: dict[str, Client] = {}
        threading.Thread(target=self._loop.run_forever, daemon=True, name="chaos-aio").start()

    # ---------------------------------------------------------------- client
    def live_address(self) -> str:
        for name, proc in self.c.coords.items():
            if proc.alive and not proc.stopped:
                return f"{self.c.net.addr(name)}:7400"
        return self.c.coordinator_addresses[0]

    def client(self) -> SyncClient:
        """A client of a replica that is running (followers forward to the leader)."""
        return SyncClient(self.live_address(), timeout=10)

    def call(self, name: str, *args: Any, tries: float = 60) -> Any:
        deadline = time.monotonic() + tries
        while True:
            try:
                return getattr(self.client(), name)(*args)
            except ClientError as err:
                if time.monotonic() > deadline:
                    raise
                self.log(f"   (retrying {name}: {err})")
                time.sleep(0.5)

    def aio(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _client(self) -> Client:
        addr = self.live_address()
        if addr not in self._clients:
            self._clients[addr] = Client(addr, timeout=5)
        return self._clients[addr]

    def get(self, txn_id: str) -> Any:
        """GetTransaction over a long-lived channel (None if no replica answers)."""
        async def one() -> Any:
            try:
                return await self._client().get(txn_id)
            except ClientError:
                return None

        try:
            return self.aio(one(), 15)
        except TimeoutError:
            return None

    def leader(self) -> str | None:
        """The replica in etcd's leader key (None if none or etcd does not answer)."""
        try:
            name = asyncio.run(leader_name(self.c.etcd_endpoints))
        except StoreUnavailableError:
            return None
        return name if name in self.c.coords else None

    # --------------------------------------------------------------- writers
    def start_writer(self) -> None:
        keys = [(h, v) for h in HOSTS for v in VMS]
        nclusters = DISK_SIZE // CLUSTER
        last: dict[tuple[Key, str, int], int] = {}
        for key in keys:
            self.h.wtimes[key] = {}

        def loop() -> None:
            g = 0
            rng = self.rng_w
            while not self._stop.is_set():
                key = rng.choice(keys)
                if key in self._dead:
                    time.sleep(0.005)
                    continue
                wl = self.c.hosts[key[0]].workloads[key[1]]
                if key[1] == BIG_VM and rng.randrange(BIG_WRITE_EVERY) == 0:
                    disk, cluster = BIG_DISK, rng.randrange(BIG_SIZE // CLUSTER)
                else:
                    disk, cluster = rng.choice(DISKS), rng.randrange(1, nclusters)
                # never the byte the cluster already holds: every write changes the disk
                byte = rng.randrange(1, 256)
                if byte == last.get((key, disk, cluster)):
                    byte = byte % 255 + 1
                try:
                    with wl.lock:
                        t0 = time.time()
                        wl._write_locked(disk, cluster, byte)
                        seq = wl.seq
                        t1 = time.time()
                except (OSError, ValueError, KeyError):
                    # the VM just died (its shadow is resynced at restart), or the lab is
                    # being torn down
                    time.sleep(0.005)
                    continue
                last[(key, disk, cluster)] = byte
                g += 1
                self.h.writes.append((g, key, seq))
                self.h.wtimes[key][seq] = (t0, t1)
                time.sleep(0.004)

        self.rng_w = random.Random(self.seed + 1)
        self._writer = threading.Thread(target=loop, daemon=True, name="chaos-writer")
        self._writer.start()

    def base(self, keys: list[Key]) -> dict[Key, Base]:
        """Each VM's disks now (write number and cluster reps), the writes held off."""
        out = {}
        for key in keys:
            wl = self.c.hosts[key[0]].workloads[key[1]]
            if not wl.lock.acquire(timeout=10):
                continue  # a guest still frozen: no replay reference for this VM
            try:
                out[key] = Base(wl.seq, {d: cluster_reps(wl.shadows[d]) for d in DISKS})
            finally:
                wl.lock.release()
        return out

    # ---------------------------------------------------------------- faults
    def wait_step(self, txn_id: str, step: str, timeout: float = 20) -> str:
        """Wait until *txn_id* reaches *step* (following its watch stream); return
        what was observed: the step, ``late`` if it was already past, ``timeout``."""
        if step == "cut":
            return "cut"

        def reached(t: Any) -> str | None:
            phase = t.phase
            if step == "run" and phase >= cpb.TXN_PHASE_RUNNING:
                return "run" if phase == cpb.TXN_PHASE_RUNNING else "late"
            if step == "barrier" and phase >= cpb.TXN_PHASE_RUNNING and (
                    all(m.job_status in ("pending", "prepared", "concluded", "done")
                        for m in t.members) or phase > cpb.TXN_PHASE_RUNNING):
                return "barrier" if phase == cpb.TXN_PHASE_RUNNING else "late"
            if step == "decided" and phase >= cpb.TXN_PHASE_DECIDED:
                return "decided" if phase == cpb.TXN_PHASE_DECIDED else "late"
            return None

        async def follow() -> str:
            while True:
                try:
                    async for t in self._client().watch(txn_id):
                        seen = reached(t)
                        if seen:
                            return seen
                    t = await self._client().get(txn_id)
                    return reached(t) or "late"
                except ClientError:
                    await asyncio.sleep(0.05)

        async def bounded() -> str:
            try:
                return await asyncio.wait_for(follow(), timeout)
            except TimeoutError:
                return "timeout"

        return str(self.aio(bounded(), timeout + 5))

    def inject(self, fault: str, txn_id: str | None, host: str | None = None) -> list[Any]:
        """Inject *fault*; return the undo actions to run once the step has passed."""
        rng = self.rng
        undo: list[Any] = []
        host = host or rng.choice(HOSTS)
        vm = rng.choice(VMS)
        h = self.c.hosts[host]
        if fault in ("kill_leader", "stop_leader"):
            name = self.leader() or rng.choice(list(self.c.coords))
            proc = self.c.coords[name]
            if fault == "kill_leader":
                proc.kill()
                undo.append(later(1.0, lambda: proc.start()))
            else:
                proc.signal(signal.SIGSTOP)
                undo.append(later(6.5, lambda: proc.signal(signal.SIGCONT)))
        elif fault in ("kill_agent", "stop_agent", "power_loss", "term_agent", "large_disk",
                       *PAUSE_FAULTS):
            agent = h.agent
            assert agent is not None and agent.proc is not None
            if fault in ("kill_agent", "power_loss", "large_disk", "pause_kill_agent"):
                agent.kill()
                if fault == "power_loss":  # the write in flight was torn
                    for name in ("journal.jsonl", "catalog.jsonl"):
                        tear_tail(h.repo / name, rng)
                down = KILL_FOR if fault == "pause_kill_agent" else 1.0
                undo.append(later(down, lambda: agent.start()))
            elif fault == "term_agent":    # as a service manager stops it
                agent.stop()
                undo.append(later(1.0, lambda: agent.start()))
            else:
                agent.proc.send_signal(signal.SIGSTOP)
                popen = agent.proc
                held = PAUSE_STOP_FOR if fault == "pause_stop_agent" else STOP_FOR
                undo.append(later(held, lambda: popen.send_signal(signal.SIGCONT)))
        elif fault in ("kill_etcd", "stop_etcd"):
            member = self.c.etcd[rng.choice(ETCD)]
            if fault == "kill_etcd":
                member.kill()
                undo.append(later(2.0, lambda: member.start()))
            else:
                member.signal(signal.SIGSTOP)
                undo.append(later(3.0, lambda: member.signal(signal.SIGCONT)))
        elif fault == "etcd_cut":  # the member runs on, its network is gone
            name = rng.choice(ETCD)
            self.c.net.cut(name)
            undo.append(later(3.0, lambda: self.c.net.heal(name)))
        elif fault == "partition":
            self.c.net.cut(host)
            undo.append(later(3.0, lambda: self.c.net.heal(host)))
        elif fault == "io_error":
            h.workloads[vm].arm_read_error(FAULTY_DISK, 0)
        elif fault == "kill_vm":
            self._dead.add((host, vm))
            h.vms[vm].kill()
            self.h.crashed.add((host, vm))
            self.pending_crashes.append((host, vm))  # applied after this txn is checked

            def revive() -> None:
                time.sleep(0.5)
                self.c.restart_vm(host, vm)
                self._dead.discard((host, vm))

            undo.append(revive)
        elif fault == "repo_full":
            ballast = h.repo / "ballast"
            free = _free_bytes(h.repo)
            subprocess.run(["fallocate", "-l", str(max(0, free - (256 << 10))), str(ballast)],
                           check=False)
            undo.append(lambda: ballast.unlink(missing_ok=True))
        elif fault == "ga_silent":
            ga = h.gas[vm]
            ga.answer_freeze = False
            undo.append(later(FREEZE_TIMEOUT + 1, lambda: setattr(ga, "answer_freeze", True)))
        elif fault == "commit_fail":
            h.failpoints.write_text("agent_commit=fail\n")
            assert txn_id is not None
            tid = txn_id

            def disarm() -> None:  # a few seconds after the decision
                self.wait_step(tid, "decided", timeout=DEADLINE + 10)
                time.sleep(3.0)
                h.failpoints.unlink(missing_ok=True)

            undo.append(disarm)
        elif fault == "prune_crash":  # inside the next removal on this host
            point = rng.choice(PRUNE_STEPS)
            h.failpoints.write_text(f"agent_after_{point}=exit\n")
            agent = h.agent
            assert agent is not None and txn_id is not None
            tid = txn_id

            def after_prune() -> None:  # its commit starts a prune: wait for the exit
                self.wait_step(tid, "decided", timeout=DEADLINE + 10)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and agent.proc is not None \
                        and agent.proc.poll() is None:
                    time.sleep(0.05)
                h.failpoints.unlink(missing_ok=True)
                hit = agent.proc is not None and agent.proc.poll() is not None
                self._prune_seen.append(point if hit else "no-prune")
                if hit:
                    time.sleep(0.5)
                    agent.start()

            undo.append(after_prune)
        return undo

    def when_paused(self, host: str, since: float, action: Callable[[], None]) -> Any:
        """A thread that runs *action* the moment QEMU reports STOP on *host*'s
        pausable VM (after *since*); its result: "cut", or "timeout"."""
        vm = self.c.pausable(host)
        assert vm is not None
        out: dict[str, str] = {}

        def run() -> None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if vm.pauses(since):
                    action()
                    out["seen"] = "cut"
                    return
                time.sleep(0.0005)
            out["seen"] = "timeout"

        t = threading.Thread(target=run, daemon=True, name="pause-trigger")
        t.start()
        return t, out

    # ------------------------------------------------------------ main loop
    def default_members(self) -> list[Member]:
        return [(h, v, d) for h in HOSTS for v in VMS for d in DISKS]

    def big_members(self) -> list[Member]:
        return [(h, BIG_VM, BIG_DISK) for h in HOSTS]

    def start_txn(self, members: list[Member], quiesce: str, speed: int) -> Any:
        return self.call("backup", [f"{h}/{v}/{d}" for h, v, d in members], BackupOptions(
            quiesce=quiesce, freeze_timeout=FREEZE_TIMEOUT, deadline=DEADLINE, speed=speed,
            group=GROUP))

    def cuts_now(self) -> dict[Key, int]:
        return {(h, v): len(self.c.hosts[h].gas[v].cuts) for h in HOSTS for v in VMS}

    def _go_on(self, elapsed: float, runs: int) -> bool:
        """Run until the duration is over and at least min_transactions were run (but
        never more than MAX_OVERRUN past the duration)."""
        if elapsed < self.duration:
            return True
        return runs < self.min_transactions and elapsed < self.duration + MAX_OVERRUN

    def run(self) -> History:
        self.start_writer()
        started = time.monotonic()
        n = 0
        while self._go_on(time.monotonic() - started, n):
            n += 1
            fault = self.rng.choice(self.faults) if n > 1 else "none"
            step = self.rng.choice(STEPS)
            if fault in CUT_ONLY:
                step = "cut"
            if fault == "concurrent":
                runs = self.run_concurrent(step)
            else:
                runs = [self.run_single(fault, step, seed_big=n == 1)]
            if self.stuck:
                self.log("   a transaction never finished: the run stops here")
                break
            for run in runs:
                self.h.runs.append(run)
                self.log(f"{n:3d} {run.txn_id} {run.fault:16s} @{run.step:8s} -> "
                         f"{'COMMIT' if run.final.decision == cpb.DECISION_COMMIT else 'ABORT '} "
                         f"{run.final.reason[:70]}")
            for run in runs:
                self.check_txn(run)
            self.check_sets_whole()
            self.cleanup_cuts(runs)
            for host, vm in self.pending_crashes:  # the checkpoints died with QEMU
                for d in self.c.hosts[host].workloads[vm].shadows:
                    self.h.last_commit[(host, vm, d)] = None
            self.pending_crashes.clear()
        self._stop.set()
        if self._writer:
            self._writer.join(10)
        self.settle()
        self.check_end()
        return self.h

    def run_single(self, fault: str, step: str, seed_big: bool = False) -> TxnRun:
        members, quiesce = self.default_members(), "freeze"
        # throttle the copy when the fault targets the run or the barrier, so that
        # the driver sees the step before the transaction has passed it
        speed = THROTTLE if step in ("run", "barrier") else 0
        if fault in PAUSE_FAULTS:
            members = [(h, PAUSE_VM, d) for h in HOSTS for d in DISKS]
            quiesce = "pause"
        if fault == "large_disk" or seed_big:
            members = members + self.big_members()
            if any(self.h.last_commit.get(m) is None for m in self.big_members()):
                speed = 0  # a full copy of 4 GiB: throttling counts its zeroes too
        run = TxnRun("", fault, step, self.cuts_now(), members, quiesce, True)
        if quiesce == "pause":
            run.base = self.base(run.vms)
        undo: list[Any] = []
        if fault in CUT_ONLY:
            undo = self.inject(fault, None)
        trigger = None
        host = self.rng.choice(HOSTS)
        run.started = time.time()
        if fault in PAUSE_FAULTS and step == "cut":
            holder: list[list[Any]] = []
            trigger = self.when_paused(host, run.started - 0.05,
                                       lambda: holder.append(self.inject(fault, None, host)))
        txn = self.start_txn(members, quiesce, speed)
        run.txn_id = txn.txn_id
        seen = step
        if trigger is not None:
            trigger[0].join(15)
            seen = trigger[1].get("seen", "timeout")
            undo = holder[0] if holder else []
        elif fault not in ("none", *CUT_ONLY):
            seen = self.wait_step(txn.txn_id, step)
            undo = self.inject(fault, txn.txn_id, host)
        self._prune_seen = []
        self.finish([run], undo)
        if fault == "prune_crash":
            seen = self._prune_seen[0] if self._prune_seen else "no-prune"
        run.step = seen
        self.h.faults[(fault, seen)] += 1
        return run

    def run_concurrent(self, step: str) -> list[TxnRun]:
        """Transaction A (every VM's d0, freeze) and B (every VM's d1, freeze or none),
        B started together with A (step cut) or when A reaches the step."""
        b_quiesce = self.rng.choice(("freeze", "none"))
        speed = THROTTLE if step in ("run", "barrier") else 0
        keys = [(h, v) for h in HOSTS for v in VMS]
        a = TxnRun("", "concurrent", step, self.cuts_now(),
                   [(h, v, "d0") for h, v in keys], "freeze", False)
        b = TxnRun("", "concurrent", step, a.cuts_before,
                   [(h, v, "d1") for h, v in keys], b_quiesce, False)
        a.base = b.base = self.base(keys)
        errors: list[str] = []

        def start(run: TxnRun) -> None:
            run.started = time.time()
            try:
                run.txn_id = self.start_txn(run.members, run.quiesce, speed).txn_id
            except ClientError as err:  # a refusal: nothing may have changed
                errors.append(str(err))

        if step == "cut":
            threads = [threading.Thread(target=start, args=(r,)) for r in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            seen = "cut"
        else:
            start(a)
            seen = self.wait_step(a.txn_id, step) if a.txn_id else "refused"
            start(b)
        runs = [r for r in (a, b) if r.txn_id]
        for r in runs:
            r.step = seen
        for err in errors:
            self.h.refused += 1
            self.log(f"   concurrent transaction refused: {err[:100]}")
        self.h.faults[("concurrent", seen)] += len(runs)
        self.finish(runs, [])
        return runs

    def finish(self, runs: list[TxnRun], undo: list[Any]) -> None:
        threads = [threading.Thread(target=u, daemon=True) for u in undo]
        for t in threads:
            t.start()
        for run in runs:
            run.final = self.wait_done(run.txn_id)
            run.ended = time.time()
            if run.final is None:
                self.bad(f"{run.txn_id} ({run.fault} @ {run.step}) never finished")
                self.stuck = True
            if run.fault == "commit_fail" and any(
                    "failpoint agent_commit" in e for e in run.final.errors):
                self.h.commit_refusals += 1
        for t in threads:
            t.join(60)

    def wait_done(self, txn_id: str, timeout: float = 120) -> Any:
        """The final state of *txn_id*, or None if it is not done in *timeout*."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self.get(txn_id)
            if t is not None and t.phase == cpb.TXN_PHASE_DONE:
                return t
            time.sleep(0.05)
        return None

    def settle(self) -> None:
        """Heal everything, let open transactions finish."""
        for name in [*HOSTS, *ETCD]:
            self.c.net.heal(name)
        for p in [*self.c.etcd.values(), *self.c.coords.values()]:
            if p.stopped:
                p.signal(signal.SIGCONT)
            if not p.alive:
                p.start()
        for h in self.c.hosts.values():
            assert h.agent is not None
            h.failpoints.unlink(missing_ok=True)
            if h.agent.proc is None or h.agent.proc.poll() is not None:
                h.agent.start()
            (h.repo / "ballast").unlink(missing_ok=True)
        time.sleep(2)
        for t in self.call("list_transactions", True):
            if self.wait_done(t.txn_id) is None:
                self.bad(f"{t.txn_id}: still open after the faults were healed")

    # --------------------------------------------------------------- checker
    def bad(self, text: str) -> None:
        self.h.violations.append(text)
        self.log(f"   VIOLATION: {text}")

    def cleanup_cuts(self, runs: list[TxnRun]) -> None:
        """Delete the freeze snapshots taken since these runs began."""
        if not runs:
            return
        for host in HOSTS:
            for vm, ga in self.c.hosts[host].gas.items():
                for cut in ga.cuts[runs[0].cuts_before[(host, vm)]:]:
                    for snapshot in cut.images.values():
                        snapshot.unlink(missing_ok=True)

    def check_bounded_quiesce(self, run: TxnRun) -> None:
        """No guest frozen, no VM paused, past its freeze deadline."""
        t = run.final
        for host in HOSTS:
            for vm, ga in self.c.hosts[host].gas.items():
                for s, e in ga.frozen_intervals[run.cuts_before[(host, vm)]:]:
                    if e - s > FREEZE_LIMIT:
                        self.bad(f"{t.txn_id}: {host}/{vm} frozen {e - s:.1f}s")
            pvm = self.c.pausable(host)
            if pvm is None or (host, PAUSE_VM) in self._dead:
                continue
            pauses = pvm.pauses(run.started - 0.05)
            if run.quiesce == "pause" or pauses:
                self.log(f"   {host}/{PAUSE_VM} paused for "
                         + ", ".join(f"{(e or time.time()) - s:.2f}s" for s, e in pauses))
            for stop, resume in pauses:
                if resume is None:
                    # still paused: wait until its deadline has surely passed, then ask QEMU
                    time.sleep(max(0.0, stop + FREEZE_LIMIT - time.time()))
                    try:
                        status = pvm.status()
                    except (OSError, RuntimeError) as err:
                        status = f"unknown ({err})"
                    if status != "running":
                        self.bad(f"{t.txn_id}: {host}/{PAUSE_VM} still {status} "
                                 f"{time.time() - stop:.1f}s after it was paused "
                                 f"(limit {FREEZE_LIMIT:g}s)")
                        try:  # let the run go on
                            qmp_call(pvm.probe_socket, "cont")
                        except (OSError, RuntimeError):
                            pass
                elif resume - stop > FREEZE_LIMIT:
                    self.bad(f"{t.txn_id}: {host}/{PAUSE_VM} paused {resume - stop:.1f}s")

    def check_txn(self, run: TxnRun) -> None:
        t = run.final
        committed = t.decision == cpb.DECISION_COMMIT
        outcomes = {m.outcome for m in t.members}
        # atomicity + single decision (agents' catalogs agree with the durable decision)
        if outcomes != {"committed" if committed else "aborted"}:
            self.bad(f"{t.txn_id}: members {outcomes} but decision {t.decision}")
        want_members = {(m.agent_id, m.vm, m.disk) for m in t.members}
        if want_members != set(run.members):
            self.bad(f"{t.txn_id}: members {sorted(want_members)} != requested")
        decision = self.call("get", t.txn_id).decision
        if decision != t.decision:
            self.bad(f"{t.txn_id}: decision changed {t.decision} -> {decision}")
        for host in HOSTS:
            repo = self.c.hosts[host].repo
            images = list((repo / "images").glob(f"*/*/{t.txn_id}.qcow2"))
            expect = sum(1 for h, _, _ in run.members if h == host)
            if committed and len(images) != expect:
                self.bad(f"{t.txn_id}: {host} holds {len(images)} images of a committed set "
                         f"of {expect}")
            if not committed and images:
                self.bad(f"{t.txn_id}: {host} kept images of an aborted transaction")
        self.check_bounded_quiesce(run)
        if not committed:
            return
        bset = self.call("set", t.txn_id)
        by_disk = {(i.agent_id, i.vm, i.disk): i for i in bset.images}
        if set(by_disk) != set(run.members):
            self.bad(f"{t.txn_id}: the set holds {sorted(set(by_disk))[:4]}..., "
                     f"not every member")
        bounds: dict[Key, tuple[int, int]] = {}

        def point_in_time(key: Key) -> tuple[int, int] | None:
            if run.quiesce == "freeze" and run.exclusive:
                return self.check_cut_snapshot(run, key)
            return self.check_replayed(run, key)

        # the restores of the check run side by side (the VMs' own order does not matter)
        for key, b in zip(run.vms, self.vm_pool.map(point_in_time, run.vms), strict=True):
            if b is not None:
                bounds[key] = b
        # no lost change: the incremental holds every write since the last commit
        for host, vm, d in run.members:
            img = by_disk.get((host, vm, d))
            b = bounds.get((host, vm))
            if img is None or b is None:
                continue
            lo, hi = b
            prev = self.h.last_commit.get((host, vm, d))
            if img.mode == 3:  # incremental
                if prev is None:
                    self.bad(f"{t.txn_id}: {host}/{vm}/{d} incremental after a crash")
                else:
                    h = self.c.hosts[host]
                    need = h.workloads[vm].clusters(d, prev, lo)
                    got = top_layer_clusters(h.repo / img.image)
                    if need - got:
                        self.bad(f"{t.txn_id}: {host}/{vm}/{d} lost clusters "
                                 f"{sorted(need - got)[:5]}")
            self.h.last_commit[(host, vm, d)] = hi
        if run.quiesce == "freeze":
            # causal consistency across VMs: one global point separates in from out
            inside = [g for g, key, seq in self.h.writes if key in bounds and seq <= bounds[key][0]]
            outside = [g for g, key, seq in self.h.writes
                       if key in bounds and seq > bounds[key][1]]
            if inside and outside and max(inside) > min(outside):
                self.bad(f"{t.txn_id}: cut not causally consistent ({max(inside)} > "
                         f"{min(outside)})")
        elif run.quiesce == "pause":
            # one instant when every member VM was paused (what a real guest needs)
            firsts = []
            for host, vm in run.vms:
                pvm = self.c.pausable(host)
                ps = pvm.pauses(run.started - 0.05) if pvm else []
                if not ps:
                    self.bad(f"{t.txn_id}: committed without pausing {host}/{vm}")
                    continue
                firsts.append((ps[0][0], ps[0][1] or time.time()))
            if firsts and max(s for s, _ in firsts) > min(e for _, e in firsts):
                self.bad(f"{t.txn_id}: the pauses do not overlap {firsts}")

    def restore(self, txn_id: str, host: str, vm: str, disk: str) -> Path:
        h = self.c.hosts[host]
        out = h.agent.restore_dir / f"chk-{txn_id}-{vm}-{disk}.raw"  # type: ignore[union-attr]
        self.call("restore", txn_id, f"{host}/{vm}/{disk}", str(out), tries=30)
        return out

    def check_cut_snapshot(self, run: TxnRun, key: Key) -> tuple[int, int] | None:
        """Point in time against the guest agent's snapshot at this transaction's freeze."""
        host, vm = key
        t = run.final
        ga = self.c.hosts[host].gas[vm]
        idx = run.cuts_before[key]
        if len(ga.cuts) <= idx:
            self.bad(f"{t.txn_id}: committed without freezing {host}/{vm}")
            return None
        cut = ga.cuts[idx]

        def one(d: str) -> None:
            out = self.restore(t.txn_id, host, vm, d)
            try:
                if not images_equal(out, "raw", cut.images[d], "raw"):
                    self.bad(f"{t.txn_id}: restore of {host}/{vm}/{d} != its cut")
                else:
                    self.h.digests.setdefault(t.txn_id, {})[(host, vm, d)] = digest(out)
            finally:
                out.unlink(missing_ok=True)

        list(self.pool.map(one, run.disks_of(key)))
        return cut.seq, cut.seq

    def check_replayed(self, run: TxnRun, key: Key) -> tuple[int, int] | None:
        """Point in time by replay: the restored disks equal the writes up to some k
        whose instant is inside this VM's pause / one of its freezes / the transaction;
        return (lowest, highest) such k."""
        host, vm = key
        t = run.final
        base = run.base.get(key)
        if base is None:
            self.log(f"   (no replay reference for {host}/{vm}: point in time not checked)")
            return None
        disks = run.disks_of(key)

        sums: dict[str, str] = {}

        def one(d: str) -> list[Any]:
            out = self.restore(t.txn_id, host, vm, d)
            try:
                sums[d] = digest(out)
                return cluster_reps(out)
            finally:
                out.unlink(missing_ok=True)

        restored = dict(zip(disks, self.pool.map(one, disks), strict=True))
        wl = self.c.hosts[host].workloads[vm]
        cur = {d: list(base.reps[d]) for d in disks}
        mism = {(d, c) for d in disks for c, r in enumerate(cur[d]) if r != restored[d][c]}
        valid = [base.seq] if not mism else []
        for s, d, c, v in wl.log[base.seq:]:
            if d in cur:
                cur[d][c] = v
                if v == restored[d][c]:
                    mism.discard((d, c))
                else:
                    mism.add((d, c))
            if not mism:
                valid.append(s)
        if not valid:
            self.bad(f"{t.txn_id}: restore of {host}/{vm} {disks} is no state the writes "
                     f"went through (point in time)")
            return None
        times = self.h.wtimes.get(key, {})

        def window(k: int) -> tuple[float, float]:
            lo = times[k][0] if k in times else float("-inf")
            hi = times[k + 1][1] if k + 1 in times else float("inf")
            return lo, hi

        if run.quiesce == "freeze":
            seqs = {c.seq for c in self.c.hosts[host].gas[vm].cuts[run.cuts_before[key]:]}
            ok = [k for k in valid if k in seqs]
            what = f"any freeze of it (cuts at {sorted(seqs)})"
        else:
            if run.quiesce == "pause":
                pvm = self.c.pausable(host)
                spans = [(s, e or time.time()) for s, e in
                         (pvm.pauses(run.started - 0.05) if pvm else [])]
                what = f"its pause {spans}"
            else:
                spans = [(run.started, run.ended)]
                what = "the transaction's lifetime"
            ok = [k for k in valid
                  if any(window(k)[0] < e and s < window(k)[1] for s, e in spans)]
        if not ok:
            self.bad(f"{t.txn_id}: {host}/{vm} {disks} equal writes {valid[0]}..{valid[-1]}, "
                     f"none inside {what}")
            return None
        for d, sha in sums.items():
            self.h.digests.setdefault(t.txn_id, {})[(host, vm, d)] = sha
        return min(ok), max(ok)

    # ------------------------------------------------------------- retention
    def catalogs(self) -> dict[str, list[Any]]:
        return {host: _catalog(self.c.hosts[host].repo) for host in HOSTS}

    def check_sets_whole(self) -> None:
        """Every listed set is whole: each image in its agent's catalog and on disk.
        (Catalogs first: a set listed after that was not being removed before it.)"""
        catalogs = self.catalogs()
        for bset in self.call("sets"):
            for i in bset.images:
                h = self.c.hosts[i.agent_id]
                if not any(c.set_id == bset.set_id and c.image == i.image
                           for c in catalogs[i.agent_id]):
                    self.bad(f"set {bset.set_id} listed, but {i.agent_id}/{i.vm}/{i.disk} "
                             f"is not in its catalog")
                elif not (h.repo / i.image).exists():
                    self.bad(f"set {bset.set_id} listed, but {i.image} is gone")

    def check_retention(self) -> None:
        """After a last prune: every listed set restores to what it held at its commit;
        every removed set is gone from every catalog and repository."""
        try:
            if not self.call("prune", GROUP, False, 120.0).done:
                self.bad("the removals under way did not end within 120 s of the healing")
        except ClientError as err:
            self.bad(f"the last prune failed: {err}")
        listed = {s.set_id: s for s in self.call("sets")}
        committed = {r.txn_id for r in self.h.runs if r.final.decision == cpb.DECISION_COMMIT}
        catalogs = self.catalogs()
        for host, rows in catalogs.items():
            orphans = {r.set_id for r in rows} - set(listed)
            if orphans:
                self.bad(f"{host}: catalog rows of sets not listed: {sorted(orphans)[:3]}")
        for txn_id in sorted(committed - set(listed)):
            self.h.removed += 1
            for host in HOSTS:
                left = list((self.c.hosts[host].repo / "images").glob(f"*/*/{txn_id}.qcow2"))
                if left:
                    self.bad(f"removed set {txn_id}: {host} still holds {left[0].name}")
        checks = [(set_id, m, sha) for set_id in sorted(listed)
                  for m, sha in self.h.digests.get(set_id, {}).items() if m[2] != BIG_DISK]

        def one(item: tuple[str, Member, str]) -> None:
            set_id, (host, vm, d), sha = item
            out = self.restore(set_id, host, vm, d)
            try:
                if digest(out) != sha:
                    self.bad(f"kept set {set_id}: {host}/{vm}/{d} restores to other content "
                             "than at its commit")
            finally:
                out.unlink(missing_ok=True)

        list(self.pool.map(one, checks))
        self.log(f"retention: {len(listed)} sets kept ({len(checks)} disks restored and "
                 f"compared), {self.h.removed} removed and gone everywhere")

    def check_end(self) -> None:
        """Nothing left behind; presumed abort and single decision on every record."""
        self.check_retention()
        for run in self.h.runs:
            got = self.call("get", run.txn_id)
            if got.decision != run.final.decision:
                self.bad(f"{run.txn_id}: decision differs at the end")
        for host in HOSTS:
            h = self.c.hosts[host]
            catalog = _catalog(h.repo)
            files = {str(p.relative_to(h.repo)) for p in (h.repo / "images").rglob("*.qcow2")}
            stray = files - {i.image for i in catalog}
            if stray:
                self.bad(f"{host}: partial/stray images {sorted(stray)[:3]}")
            for vm, lab_vm in h.vms.items():
                jobs = [j for j in qmp_call(lab_vm.probe_socket, "query-jobs")
                        if str(j["id"]).startswith("btx")]
                if jobs:
                    self.bad(f"{host}/{vm}: stray jobs {jobs}")
                if h.gas[vm].is_frozen:
                    self.bad(f"{host}/{vm}: guest left frozen")
                if isinstance(lab_vm, PausableVm) and lab_vm.status() != "running":
                    self.bad(f"{host}/{vm}: VM left {lab_vm.status()}")
                for d in (d.name for d in lab_vm.disks):
                    ours = {n for n in dirty_counts(lab_vm, d) if n.startswith("blocktxn:")}
                    last = [i for i in catalog if (i.vm, i.disk) == (vm, d)]
                    want = {f"blocktxn:{last[-1].set_id}"} if last else set()
                    if ours - want:
                        self.bad(f"{host}/{vm}/{d}: stray bitmaps {sorted(ours - want)}")
                    if want and not ours and (host, vm) not in self.h.crashed:
                        self.bad(f"{host}/{vm}/{d}: checkpoint lost without a crash")


def digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def later(delay: float, action: Any) -> Any:
    """An undo step: wait *delay* seconds, then act."""

    def run() -> None:
        time.sleep(delay)
        action()

    return run


def _catalog(repo: Path) -> list[Any]:
    """The agent's catalog, replayed as the agent replays it (a torn last line is no
    record; rebase and remove records apply to the images before them). Reads only."""
    from blocktxn.agent.repository import Repository

    return Repository(repo, []).images()


def _free_bytes(path: Path) -> int:
    import os

    st = os.statvfs(path)
    return min(st.f_bavail * st.f_frsize, REPO_SIZE)
