"""The chaos driver (runs inside the client namespace): back-to-back grouped
transactions, writers running all the time, one seeded fault per transaction at
a chosen protocol step, a recorded history, and the invariant checker."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blocktxn.client import BackupOptions, ClientError, SyncClient
from blocktxn.coordinator.errors import StoreUnavailableError
from blocktxn.coordinator.store import leader_name
from blocktxn.demo.lab import CLUSTER, dirty_counts, images_equal, qmp_call, top_layer_clusters
from blocktxn.v1 import coordinator_pb2 as cpb
from tests.chaos.cluster import (
    DISK_SIZE,
    DISKS,
    ETCD,
    FAULTY_DISK,
    HOSTS,
    REPO_SIZE,
    VMS,
    ChaosCluster,
)

FAULTS = ("none", "kill_leader", "stop_leader", "kill_agent", "stop_agent", "kill_etcd",
          "stop_etcd", "partition", "io_error", "kill_vm", "repo_full", "ga_silent",
          "power_loss", "term_agent")
STEPS = ("cut", "run", "barrier", "decided")
FREEZE_TIMEOUT = 4.0
DEADLINE = 25.0
STOP_FOR = 6.0  # SIGSTOP of an agent: longer than the freeze timeout (the watchdog thaws)


def tear_tail(path: Path, rng: random.Random) -> None:
    """Append a prefix of the file's last record: a write that power loss cut short."""
    if not path.exists():
        return
    lines = path.read_bytes().splitlines()
    if lines:
        last = lines[-1]
        with open(path, "ab") as f:
            f.write(last[: rng.randrange(1, len(last))])


@dataclass
class TxnRun:
    txn_id: str
    fault: str
    step: str
    cuts_before: dict[tuple[str, str], int]
    final: Any = None


@dataclass
class History:
    runs: list[TxnRun] = field(default_factory=list)
    faults: Counter[tuple[str, str]] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    # per (host, vm, disk): workload seq of the last committed cut, None after a VM crash
    last_commit: dict[tuple[str, str, str], int | None] = field(default_factory=dict)
    crashed: set[tuple[str, str]] = field(default_factory=set)
    writes: list[tuple[int, tuple[str, str], int]] = field(default_factory=list)  # g, vm, seq


class Driver:
    def __init__(self, cluster: ChaosCluster, seed: int, duration: float, log: Any) -> None:
        self.c = cluster
        self.rng = random.Random(seed)
        self.seed = seed
        self.duration = duration
        self.h = History()
        self.log = log
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._dead: set[tuple[str, str]] = set()
        self.pending_crashes: list[tuple[str, str]] = []

    # ---------------------------------------------------------------- client
    def client(self) -> SyncClient:
        """A client of a replica that is running (followers forward to the leader)."""
        for name, proc in self.c.coords.items():
            if proc.alive and not proc.stopped:
                return SyncClient(f"{self.c.net.addr(name)}:7400", timeout=10)
        return SyncClient(self.c.coordinator_addresses[0], timeout=10)

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

        def loop() -> None:
            g = 0
            while not self._stop.is_set():
                key = self.rng_w.choice(keys)
                if key in self._dead:
                    time.sleep(0.005)
                    continue
                wl = self.c.hosts[key[0]].workloads[key[1]]
                try:
                    wl.write(self.rng_w.choice(DISKS), self.rng_w.randrange(1, nclusters))
                except OSError:
                    continue  # the VM just died; its shadow is resynced at restart
                g += 1
                self.h.writes.append((g, key, wl.seq))
                time.sleep(0.004)

        self.rng_w = random.Random(self.seed + 1)
        self._writer = threading.Thread(target=loop, daemon=True, name="chaos-writer")
        self._writer.start()

    # ---------------------------------------------------------------- faults
    def wait_step(self, txn_id: str, step: str, timeout: float = 20) -> str:
        """Wait until *txn_id* reaches *step*; return what was observed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                t = self.client().get(txn_id)
            except ClientError:
                time.sleep(0.05)
                continue
            phase = t.phase
            if step == "cut":
                return "cut"
            if step == "run" and phase >= cpb.TXN_PHASE_RUNNING:
                return "run" if phase == cpb.TXN_PHASE_RUNNING else "late"
            if step == "barrier" and phase >= cpb.TXN_PHASE_RUNNING and (
                    all(m.job_status in ("pending", "prepared", "concluded", "done")
                        for m in t.members) or phase > cpb.TXN_PHASE_RUNNING):
                return "barrier" if phase == cpb.TXN_PHASE_RUNNING else "late"
            if step == "decided" and phase >= cpb.TXN_PHASE_DECIDED:
                return "decided" if phase == cpb.TXN_PHASE_DECIDED else "late"
            time.sleep(0.02)
        return "timeout"

    def inject(self, fault: str, txn_id: str | None) -> list[Any]:
        """Inject *fault*; return the undo actions to run once the step has passed."""
        rng = self.rng
        undo: list[Any] = []
        host = rng.choice(HOSTS)
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
        elif fault in ("kill_agent", "stop_agent", "power_loss", "term_agent"):
            agent = h.agent
            assert agent is not None and agent.proc is not None
            if fault in ("kill_agent", "power_loss"):
                agent.kill()
                if fault == "power_loss":  # the write in flight was torn
                    for name in ("journal.jsonl", "catalog.jsonl"):
                        tear_tail(h.repo / name, rng)
                undo.append(later(1.0, lambda: agent.start()))
            elif fault == "term_agent":    # as a service manager stops it
                agent.stop()
                undo.append(later(1.0, lambda: agent.start()))
            else:
                agent.proc.send_signal(signal.SIGSTOP)
                popen = agent.proc
                undo.append(later(STOP_FOR, lambda: popen.send_signal(signal.SIGCONT)))
        elif fault in ("kill_etcd", "stop_etcd"):
            member = self.c.etcd[rng.choice(ETCD)]
            if fault == "kill_etcd":
                member.kill()
                undo.append(later(2.0, lambda: member.start()))
            else:
                member.signal(signal.SIGSTOP)
                undo.append(later(3.0, lambda: member.signal(signal.SIGCONT)))
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
        return undo

    # ------------------------------------------------------------ main loop
    def run(self) -> History:
        self.start_writer()
        targets = [f"{h}/{v}" for h in HOSTS for v in VMS]
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < self.duration:
            n += 1
            fault = self.rng.choice(FAULTS) if n > 1 else "none"
            step = self.rng.choice(STEPS)
            if fault in ("repo_full", "ga_silent", "io_error"):
                step = "cut"  # these act on what the transaction is about to do
            cuts_before = {(h, v): len(self.c.hosts[h].gas[v].cuts)
                           for h in HOSTS for v in VMS}
            undo: list[Any] = []
            if fault in ("repo_full", "ga_silent", "io_error"):
                undo = self.inject(fault, None)
            # throttle the copy when the fault targets the run or the barrier, so that
            # the driver sees the step before the transaction has passed it
            speed = 2 << 20 if step in ("run", "barrier") else 0
            txn = self.call("backup", targets, BackupOptions(
                quiesce="freeze", freeze_timeout=FREEZE_TIMEOUT, deadline=DEADLINE,
                speed=speed))
            seen = step
            if fault not in ("none", "repo_full", "ga_silent", "io_error"):
                seen = self.wait_step(txn.txn_id, step)
                undo = self.inject(fault, txn.txn_id)
            self.h.faults[(fault, seen)] += 1
            threads = [threading.Thread(target=u, daemon=True) for u in undo]
            for t in threads:
                t.start()
            final = self.wait_done(txn.txn_id)
            for t in threads:
                t.join(30)
            run = TxnRun(txn.txn_id, fault, seen, cuts_before, final)
            self.h.runs.append(run)
            self.log(f"{n:3d} {txn.txn_id} {fault:12s} @{seen:8s} -> "
                     f"{'COMMIT' if final.decision == cpb.DECISION_COMMIT else 'ABORT '} "
                     f"{final.reason[:70]}")
            self.check_txn(run)
            for host, vm in self.pending_crashes:  # the checkpoints died with QEMU
                for d in DISKS:
                    self.h.last_commit[(host, vm, d)] = None
            self.pending_crashes.clear()
        self._stop.set()
        if self._writer:
            self._writer.join(10)
        self.settle()
        self.check_end()
        return self.h

    def wait_done(self, txn_id: str, timeout: float = 120) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                t = self.client().get(txn_id)
                if t.phase == cpb.TXN_PHASE_DONE:
                    return t
            except ClientError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{txn_id} never finished")

    def settle(self) -> None:
        """Heal everything, let open transactions finish."""
        for name in HOSTS:
            self.c.net.heal(name)
        for p in [*self.c.etcd.values(), *self.c.coords.values()]:
            if p.stopped:
                p.signal(signal.SIGCONT)
            if not p.alive:
                p.start()
        for h in self.c.hosts.values():
            assert h.agent is not None
            if h.agent.proc is None or h.agent.proc.poll() is not None:
                h.agent.start()
            (h.repo / "ballast").unlink(missing_ok=True)
        time.sleep(2)
        for t in self.call("list_transactions", True):
            self.wait_done(t.txn_id)

    # --------------------------------------------------------------- checker
    def bad(self, text: str) -> None:
        self.h.violations.append(text)
        self.log(f"   VIOLATION: {text}")

    def check_txn(self, run: TxnRun) -> None:
        t = run.final
        committed = t.decision == cpb.DECISION_COMMIT
        outcomes = {m.outcome for m in t.members}
        # atomicity + single decision (agents' catalogs agree with the durable decision)
        if outcomes != {"committed" if committed else "aborted"}:
            self.bad(f"{t.txn_id}: members {outcomes} but decision {t.decision}")
        decision = self.call("get", t.txn_id).decision
        if decision != t.decision:
            self.bad(f"{t.txn_id}: decision changed {t.decision} -> {decision}")
        for host in HOSTS:
            repo = self.c.hosts[host].repo
            images = list((repo / "images").glob(f"*/*/{t.txn_id}.qcow2"))
            if committed and len(images) != len(VMS) * len(DISKS):
                self.bad(f"{t.txn_id}: {host} holds {len(images)} images of a committed set")
            if not committed and images:
                self.bad(f"{t.txn_id}: {host} kept images of an aborted transaction")
        # bounded freeze
        for host in HOSTS:
            for vm, ga in self.c.hosts[host].gas.items():
                for s, e in ga.frozen_intervals[run.cuts_before[(host, vm)]:]:
                    if e - s > FREEZE_TIMEOUT + 2.5:
                        self.bad(f"{t.txn_id}: {host}/{vm} frozen {e - s:.1f}s")
        if not committed:
            for host in HOSTS:
                for vm, ga in self.c.hosts[host].gas.items():
                    for cut in ga.cuts[run.cuts_before[(host, vm)]:]:
                        for snapshot in cut.images.values():
                            snapshot.unlink(missing_ok=True)
            return
        bset = self.call("set", t.txn_id)
        by_disk = {(i.agent_id, i.vm, i.disk): i for i in bset.images}
        cut_g: dict[tuple[str, str], int] = {}
        for host in HOSTS:
            h = self.c.hosts[host]
            for vm in VMS:
                ga = h.gas[vm]
                idx = run.cuts_before[(host, vm)]
                if len(ga.cuts) <= idx:
                    self.bad(f"{t.txn_id}: committed without freezing {host}/{vm}")
                    continue
                cut = ga.cuts[idx]
                cut_g[(host, vm)] = cut.seq
                for d in DISKS:
                    img = by_disk.get((host, vm, d))
                    if img is None:
                        self.bad(f"{t.txn_id}: set lacks {host}/{vm}/{d}")
                        continue
                    # no lost change: the incremental holds every write since the last commit
                    prev = self.h.last_commit.get((host, vm, d))
                    if img.mode == 3:  # incremental
                        if prev is None:
                            self.bad(f"{t.txn_id}: {host}/{vm}/{d} incremental after a crash")
                        else:
                            need = h.workloads[vm].clusters(d, prev, cut.seq)
                            got = top_layer_clusters(h.repo / img.image)
                            if need - got:
                                self.bad(f"{t.txn_id}: {host}/{vm}/{d} lost clusters "
                                         f"{sorted(need - got)[:5]}")
                    self.h.last_commit[(host, vm, d)] = cut.seq
                    # point in time: the restore equals the content at the cut
                    out = h.agent.restore_dir / f"chk-{t.txn_id}-{vm}-{d}.raw"  # type: ignore
                    try:
                        self.call("restore", t.txn_id, f"{host}/{vm}/{d}", str(out), tries=30)
                        if not images_equal(out, "raw", cut.images[d], "raw"):
                            self.bad(f"{t.txn_id}: restore of {host}/{vm}/{d} != its cut")
                    finally:
                        out.unlink(missing_ok=True)
                    cut.images[d].unlink(missing_ok=True)
        # causal consistency across VMs: one global point separates in from out
        inside = [g for g, key, seq in self.h.writes if key in cut_g and seq <= cut_g[key]]
        outside = [g for g, key, seq in self.h.writes if key in cut_g and seq > cut_g[key]]
        if inside and outside and max(inside) > min(outside):
            self.bad(f"{t.txn_id}: cut not causally consistent ({max(inside)} > "
                     f"{min(outside)})")

    def check_end(self) -> None:
        """Nothing left behind; presumed abort and single decision on every record."""
        for run in self.h.runs:
            got = self.call("get", run.txn_id)
            if got.decision != run.final.decision:
                self.bad(f"{run.txn_id}: decision differs at the end")
        for host in HOSTS:
            h = self.c.hosts[host]
            catalog = {i.image for i in _catalog(h.repo)}
            files = {str(p.relative_to(h.repo)) for p in (h.repo / "images").rglob("*.qcow2")}
            if files - catalog:
                self.bad(f"{host}: partial/stray images {sorted(files - catalog)[:3]}")
            for vm, lab_vm in h.vms.items():
                jobs = [j for j in qmp_call(lab_vm.probe_socket, "query-jobs")
                        if str(j["id"]).startswith("btx")]
                if jobs:
                    self.bad(f"{host}/{vm}: stray jobs {jobs}")
                if h.gas[vm].is_frozen:
                    self.bad(f"{host}/{vm}: guest left frozen")
                for d in DISKS:
                    ours = {n for n in dirty_counts(lab_vm, d) if n.startswith("blocktxn:")}
                    last = [i for i in _catalog(h.repo) if (i.vm, i.disk) == (vm, d)]
                    want = {f"blocktxn:{last[-1].set_id}"} if last else set()
                    if ours - want:
                        self.bad(f"{host}/{vm}/{d}: stray bitmaps {sorted(ours - want)}")
                    if want and not ours and (host, vm) not in self.h.crashed:
                        self.bad(f"{host}/{vm}/{d}: checkpoint lost without a crash")


def later(delay: float, action: Any) -> Any:
    """An undo step: wait *delay* seconds, then act."""

    def run() -> None:
        time.sleep(delay)
        action()

    return run


def _catalog(repo: Path) -> list[Any]:
    from blocktxn.agent.participant_messages import ImageRecord

    path = repo / "catalog.jsonl"
    if not path.exists():
        return []
    import json

    return [ImageRecord(**json.loads(line)) for line in path.read_text().splitlines() if line]


def _free_bytes(path: Path) -> int:
    import os

    st = os.statvfs(path)
    return min(st.f_bavail * st.f_frsize, REPO_SIZE)

