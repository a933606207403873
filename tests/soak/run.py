"""The soak driver: back-to-back grouped transactions of every VM with writers running,
retention after each commit on a clock that runs hours per transaction, a seeded
fraction of injected faults, samples of every curve, and the checks.

Per transaction (one after the other): the clock offset moves on by ``hours``; with
probability ``fault_rate`` one fault is armed: ``read_error`` (a one-shot EIO under a
random disk: the backup job reading it fails, the transaction must abort),
``commit_fail`` (``agent_commit=fail`` on one agent for 1-3 s: the decided COMMIT is
retried until it applies, the transaction must commit) or ``agent_kill`` (agent
``KILLED`` SIGKILLed 0-0.6 s into the transaction and restarted: either outcome). A
transaction without a fault must commit. After each one: bounded freeze (every
guest thawed, no freeze longer than the freeze timeout + 3 s), and for a committed
one the stand-in guest agents' snapshot at its freeze is kept as the content each
disk of the set must restore to.

After a commit the next backup waits until the automatic prune of that commit is
done (``prune_gap``: on a 6-hourly schedule it has hours; with ``--no-prune-gap`` the
backups follow at once and the prune, which must wait for a moment with no open
transaction on the disk, falls behind); the seconds it took are a curve.

Every ``every`` transactions: the samples, as they are (repository bytes and catalog
rows per agent, sets awaiting removal, etcd size/keys, RSS and descriptors of every
daemon, QEMU nodes left behind, throughput); then, once the prune has settled, the
checks: retention (the listed sets are a fixed point of the policy, at most 16, and
hold every set the policy keeps of all sets ever committed), every removed set gone
everywhere, nothing left that nothing owns, and a sample of kept sets restored and
verified. At the end the same with writers stopped, and every kept set restored and
verified.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from blocktxn import retention
from blocktxn.coordinator import etcd_server
from blocktxn.demo.lab import images_equal, qmp_call
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb
from blocktxn.v1 import coordinator_pb2_grpc as cpb_grpc
from tests.integration.cluster import Cluster
from tests.integration.harness import Host
from tests.soak import probe, report
from tests.soak.lab import ARMS, SoakHost

GROUP = "soak"
POLICY = {"keep-last": 5, "keep-daily": 7, "keep-weekly": 4}
MAX_KEPT = sum(POLICY.values())  # the policy never keeps more sets than this
KILLED = "h2"  # the only agent ever SIGKILLed: h1's curves are one long-lived process
FAULTS = ("read_error", "commit_fail", "agent_kill")
FREEZE_TIMEOUT = 10.0
DEADLINE = 120.0  # of each transaction (presumed abort past it)
SETTLE = 120.0  # seconds the prune of the last commit may take to settle
MAX_FAILURES = 50


@dataclass
class Options:
    transactions: int = 2000
    every: int = 100
    out: Path = Path("/tmp/soak-out")
    seed: int = 1
    hours: float = 6.0
    fault_rate: float = 0.07
    agents: int = 2
    vms: int = 2
    disks: int = 2
    disk_mib: int = 4
    write_interval: float = 0.02
    keep_finished: str = "120s"
    keep_audit: str = "120s"
    etcd_compaction: str = "1m"
    etcd_snapshot_count: str = "product"
    plateau: str = "enforce"  # or "report": verdicts printed, not part of PASS
    prune_gap: bool = True  # False: the next backup starts at once (prune steps wait between)
    workdir: Path | None = None
    keep_files: bool = False


@dataclass
class Fault:
    kind: str  # "none" or one of FAULTS
    host: str = ""
    vm: str = ""
    disk: str = ""
    seconds: float = 0.0
    undo: Callable[[], None] = lambda: None


@dataclass
class Tally:
    committed: int = 0
    aborted: int = 0
    start_errors: int = 0
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (fault, outcome)


class Soak:
    def __init__(self, opts: Options, workdir: Path) -> None:
        self.o = opts
        self.workdir = workdir
        self.rng = random.Random(opts.seed)
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.rows: list[dict[str, float]] = []
        self.tally = Tally()
        self.created: dict[str, float] = {}   # every set ever committed -> its set time
        self.gone_checked: set[str] = set()   # removed sets already checked gone
        self.last_committed = ""
        self.cuts = workdir / "cuts"          # set -> (agent-vm-disk.raw: content at cut)
        self.clock = workdir / "clock"
        self.cluster: Cluster | None = None
        self.soak_hosts: dict[str, SoakHost] = {}
        self.arms: Counter[tuple[str, str, str]] = Counter()
        self.pending_arms: set[tuple[str, str, str]] = set()
        self.prune_wait: list[float] = []  # seconds each commit's prune took (this window)
        self.anomalies: list[tuple[int, str]] = []  # (txn, what): product races, not failures
        self.seen: Counter[str] = Counter()  # leftovers reported, by what they are
        self.restored_sets: set[str] = set()
        self.restored_disks = 0
        self.started = time.monotonic()
        self.policy = retention.Policy.from_mapping(POLICY)

    # ------------------------------------------------------------------ set-up
    @property
    def c(self) -> Cluster:
        assert self.cluster is not None
        return self.cluster

    def hosts(self) -> list[str]:
        return [f"h{a + 1}" for a in range(self.o.agents)]

    def vm_disks(self) -> dict[str, list[str]]:
        return {f"vm{v + 1}": [f"d{d}" for d in range(self.o.disks)] for v in range(self.o.vms)}

    def targets(self) -> list[str]:
        return [f"{h}/{vm}" for h in self.hosts() for vm in self.vm_disks()]

    def disks(self) -> list[tuple[str, str, str]]:
        return [(h, vm, d) for h in self.hosts() for vm, ds in self.vm_disks().items()
                for d in ds]

    def setup(self) -> None:
        self.cuts.mkdir(parents=True, exist_ok=True)
        self.set_clock(0)
        policy_text = ",".join(f"{k}={v}" for k, v in POLICY.items())
        args = ["--retention", f"{GROUP}={policy_text}"]
        helptext = subprocess.run([sys.executable, "-m", "blocktxn", "coordinator", "--help"],
                                  capture_output=True, text=True, timeout=60).stdout
        if "--keep-finished" in helptext:
            args += ["--keep-finished", self.o.keep_finished]
            self.notes.append(f"coordinator --keep-finished {self.o.keep_finished} (the "
                              "soak compresses time: default 7d scaled down)")
        else:
            self.notes.append("coordinator has no --keep-finished: finished transaction "
                              "records are never collected")
        if "--keep-audit" in helptext:
            args += ["--keep-audit", self.o.keep_audit]
            self.notes.append(f"coordinator --keep-audit {self.o.keep_audit} (the soak "
                              "compresses time: default 90d scaled down)")
        self.scale_etcd()
        self.cluster = Cluster(self.workdir / "cluster", 1, coordinator_args=args,
                               env={"BLOCKTXN_CLOCK_FILE": str(self.clock)})
        for h in self.hosts():
            host = SoakHost(self.c.workdir / h, self.vm_disks(), agent_id=h,
                            disk_size=self.o.disk_mib << 20)
            self.soak_hosts[h] = host
            self.c.hosts[h] = host
            host.agent.extra = ["--coordinator", self.c.addresses, *self.c.extra]
            host.start_agent()
        self.c.wait_registered(self.o.agents, timeout=60)
        for h, soak_host in self.soak_hosts.items():  # every cluster written once: a full base
            for k, (vm, wl) in enumerate(soak_host.workloads.items()):
                for d in self.vm_disks()[vm]:
                    for cl in range(wl.vm.disks[0].size // (64 << 10)):
                        wl.write(d, cl)
                wl.start_background(self.o.write_interval,
                                    seed=self.o.seed * 1000 + int(h[1:]) * 10 + k)

    def scale_etcd(self) -> None:
        """etcd's time- and count-based upkeep, scaled down like the clock: periodic
        auto-compaction (product: 1h; the soak scales it down) and the raft log kept in
        memory until a snapshot (the product's --snapshot-count 10000, ~10 entries per
        transaction: kept unless asked). EtcdServer splices its module constants
        COMPACTION and SNAPSHOT into etcd's command line: the soak sets them."""
        compaction = getattr(etcd_server, "COMPACTION", None)
        if compaction is None:
            self.notes.append("etcd auto-compaction: none in this tree (EtcdServer has no "
                              "COMPACTION): etcd keeps every revision")
            return
        flags = list(compaction)
        if self.o.etcd_compaction == "product":
            self.notes.append(f"etcd auto-compaction: the product's {' '.join(compaction)}")
        else:
            flags = ["--auto-compaction-mode", "periodic", "--auto-compaction-retention",
                     self.o.etcd_compaction]
            self.notes.append(f"etcd auto-compaction: periodic {self.o.etcd_compaction} (the "
                              f"product's {' '.join(compaction)}, scaled down with the clock)")
        snapshot = tuple(getattr(etcd_server, "SNAPSHOT", ()))
        if self.o.etcd_snapshot_count != "product":
            snapshot = ("--snapshot-count", self.o.etcd_snapshot_count)
            self.notes.append(f"etcd --snapshot-count {self.o.etcd_snapshot_count} (not the "
                              f"product's {' '.join(getattr(etcd_server, 'SNAPSHOT', ()))})")
        else:
            self.notes.append(f"etcd snapshots: the product's {' '.join(snapshot) or 'default'}")
        setattr(etcd_server, "COMPACTION", tuple(flags))  # noqa: B010
        setattr(etcd_server, "SNAPSHOT", snapshot)  # noqa: B010
        self.notes.append(f"etcd flags added: {' '.join((*flags, *snapshot))}")

    def set_clock(self, offset: float) -> None:
        tmp = self.clock.with_suffix(".tmp")
        tmp.write_text(f"{offset:.0f}\n")
        tmp.replace(self.clock)  # atomic: the coordinator never reads a half-written file

    def host(self, h: str) -> Host:
        return self.c.hosts[h]

    # ------------------------------------------------------------------ checks
    def fail(self, msg: str, once: str = "") -> None:
        """A failed check; one that names a leftover (*once*) counts the first time."""
        if once:
            self.seen[once] += 1
            if self.seen[once] > 1:
                return
        self.failures.append(msg)
        print(f"FAIL: {msg}", flush=True)

    def stub(self) -> cpb_grpc.CoordinatorServiceStub:
        return self.c.any_stub()

    # -------------------------------------------------------- one transaction
    def pick_fault(self, i: int) -> Fault:
        if i <= 3 or self.rng.random() >= self.o.fault_rate:
            return Fault("none")
        kind = self.rng.choice(FAULTS)
        if kind == "read_error":
            choices = [k for k in self.disks() if self.arms[k] < ARMS]
            if not choices:
                return Fault("none")
            h, vm, d = self.rng.choice(choices)
            return Fault(kind, h, vm, d)
        if kind == "commit_fail":
            return Fault(kind, self.rng.choice(self.hosts()), seconds=self.rng.uniform(1, 3))
        return Fault(kind, KILLED if KILLED in self.hosts() else self.hosts()[-1],
                     seconds=self.rng.uniform(0, 0.6))

    def arm(self, f: Fault) -> None:
        if f.kind == "read_error":
            wl = self.host(f.host).workloads[f.vm]
            written = sorted(wl.clusters(f.disk, 0))
            wl.arm_read_error(f.disk, self.rng.choice(written))
            self.arms[(f.host, f.vm, f.disk)] += 1
        elif f.kind == "commit_fail":
            path = self.soak_hosts[f.host].failpoint_file
            tmp = path.with_suffix(".tmp")
            tmp.write_text("agent_commit=fail\n")
            tmp.replace(path)
            timer = threading.Timer(f.seconds, lambda: path.unlink(missing_ok=True))
            timer.start()

            def undo() -> None:
                timer.join()
                path.unlink(missing_ok=True)

            f.undo = undo

    def kill_agent(self, f: Fault) -> None:
        time.sleep(f.seconds)
        host = self.host(f.host)
        host.kill_agent()
        time.sleep(self.rng.uniform(0.2, 1.5))
        host.start_agent()

    def one(self, i: int) -> None:
        self.set_clock(i * self.o.hours * 3600)
        self.settle_guests(i)
        self.wait_agents(i)
        fault = self.pick_fault(i)
        before = {(h, vm): (len(ga.cuts), len(ga.frozen_intervals))
                  for h in self.hosts() for vm, ga in self.host(h).gas.items()}
        self.arm(fault)
        try:
            txn = self.c.start(self.targets(), quiesce=apb.QUIESCE_FREEZE, group=GROUP,
                               request_id=f"soak{self.o.seed}-{i}", deadline_s=DEADLINE,
                               freeze_timeout_s=FREEZE_TIMEOUT)
        except grpc.RpcError as err:
            fault.undo()
            self.tally.start_errors += 1
            self.fail(f"txn {i}: StartTransaction refused: {err.code()} {err.details()}")
            self.drop_new_cuts(before)
            return
        if fault.kind == "agent_kill":
            self.kill_agent(fault)
        try:
            done = self.wait_done(txn.txn_id)
        finally:
            fault.undo()
        self.account(i, fault, done, before)

    def wait_done(self, txn_id: str) -> cpb.Transaction:
        deadline = time.monotonic() + DEADLINE + 60
        req = cpb.GetTransactionRequest(txn_id=txn_id)
        while time.monotonic() < deadline:
            try:
                for t in self.stub().WatchTransaction(req, timeout=deadline - time.monotonic()):
                    if t.phase == cpb.TXN_PHASE_DONE:
                        return t
                t = self.stub().GetTransaction(req, timeout=10)
                if t.phase == cpb.TXN_PHASE_DONE:
                    return t
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{txn_id} not done after {DEADLINE + 60:.0f}s")

    def account(self, i: int, f: Fault, done: cpb.Transaction,
                before: dict[tuple[str, str], tuple[int, int]]) -> None:
        committed = done.decision == cpb.DECISION_COMMIT
        outcome = "commit" if committed else "abort"
        if committed:
            self.tally.committed += 1
        else:
            self.tally.aborted += 1
        io_error = "Input/output error" in done.reason
        if f.kind == "read_error" and not io_error:
            self.pending_arms.add((f.host, f.vm, f.disk))  # not read yet: still armed
        expected = {"none": "commit", "commit_fail": "commit", "read_error": "abort"}
        why = ""
        if not committed and "being pruned" in done.reason:
            why = "prune_busy"  # the agent refused the cut: retry (the next transaction)
        elif not committed and io_error and self.pending_arms:
            why = "late_read_error"  # an error armed earlier, read only now
        if io_error:
            self.pending_arms.clear()
        self.tally.outcomes[(f.kind, outcome + (f"({why})" if why else ""))] += 1
        if f.kind in expected and outcome != expected[f.kind] and not why:
            self.fail(f"txn {i} {done.txn_id} ({f.kind} {f.host}/{f.vm}/{f.disk}): "
                      f"{outcome}, expected {expected[f.kind]}: {done.reason}")
        with open(self.o.out / "soak-txns.jsonl", "a") as log:
            log.write(json.dumps({
                "n": i, "txn": done.txn_id, "fault": f.kind,
                "where": "/".join(x for x in (f.host, f.vm, f.disk) if x),
                "outcome": outcome, "why": why, "reason": done.reason,
                "seconds": round(time.time() - done.created_at, 3),
                "errors": list(done.errors)[-3:]}) + "\n")
        for (h, vm), (_, nfrozen) in before.items():
            for start, end in self.host(h).gas[vm].frozen_intervals[nfrozen:]:
                if end - start > FREEZE_TIMEOUT + 3:
                    self.fail(f"txn {i}: {h}/{vm} frozen {end - start:.1f}s")
        if not committed:
            self.drop_new_cuts(before)
            return
        if done.set_id != done.txn_id:
            self.fail(f"txn {i}: committed with set id {done.set_id!r}")
        keep = self.cuts / done.set_id
        keep.mkdir()
        for (h, vm), (ncuts, _) in before.items():
            new = self.host(h).gas[vm].cuts[ncuts:]
            if len(new) != 1:
                self.fail(f"txn {i}: {h}/{vm}: {len(new)} freezes in one transaction")
            if new:
                for d, path in new[-1].images.items():
                    path.replace(keep / f"{h}-{vm}-{d}.raw")
            for cut in new[:-1]:
                for path in cut.images.values():
                    path.unlink(missing_ok=True)
        bset = self.backup_set(i, done.set_id)
        if bset is None:
            return
        got = {(m.agent_id, m.vm, m.disk) for m in bset.images}
        if got != set(self.disks()) or bset.group != GROUP:
            self.fail(f"txn {i}: set {done.set_id} holds {sorted(got)} group {bset.group!r}")
        self.created[done.set_id] = bset.created_at or bset.cut_at
        self.last_committed = done.txn_id
        if self.o.prune_gap:
            self.wait_pruned(i)

    def backup_set(self, i: int, set_id: str) -> cpb.BackupSet | None:
        """The set a transaction reported DONE made. The coordinator wakes watchers
        before its final record and the set are written to etcd, so the set may be
        NOT_FOUND for a moment: an anomaly (counted); not readable in 10 s: a failure."""
        deadline = time.monotonic() + 10
        while True:
            try:
                found = self.stub().GetBackupSet(cpb.GetBackupSetRequest(set_id=set_id),
                                                 timeout=10)
                return found
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                    self.fail(f"txn {i}: set {set_id}: GetBackupSet {err.code()} "
                              f"{err.details()}")
                    return None
                if not self.anomalies or self.anomalies[-1][0] != i:
                    self.anomalies.append((i, f"txn {i}: reported DONE with set {set_id}, "
                                           "which GetBackupSet did not find yet"))
                time.sleep(0.05)

    def wait_pruned(self, i: int) -> None:
        """Give the automatic prune of this commit its gap before the next backup (on
        a 6-hourly schedule it has hours): wait until the listed sets are a fixed point
        of the policy and no agent holds an image of any other set; the seconds it
        took are a curve."""
        t0 = time.monotonic()
        deadline = t0 + SETTLE
        while time.monotonic() < deadline:
            try:
                listed = self.listed()
                kept = {v.set_id for v in retention.plan(self.infos(listed), self.policy)
                        if v.keep}
                if kept == set(listed) and all(
                        {m.set_id for m in self.images(h)} <= kept for h in self.hosts()):
                    self.prune_wait.append(time.monotonic() - t0)
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        self.prune_wait.append(time.monotonic() - t0)
        self.fail(f"txn {i}: the prune after it did not finish in {SETTLE:.0f}s")

    def drop_new_cuts(self, before: dict[tuple[str, str], tuple[int, int]]) -> None:
        for (h, vm), (ncuts, _) in before.items():
            for cut in self.host(h).gas[vm].cuts[ncuts:]:
                for path in cut.images.values():
                    path.unlink(missing_ok=True)

    def settle_guests(self, i: int) -> None:
        """Bounded freeze: every guest is thawed (by the agent, or at the freeze
        deadline by its watchdog) before the next transaction."""
        deadline = time.monotonic() + FREEZE_TIMEOUT + 5
        frozen = [f"{h}/{vm}" for h in self.hosts() for vm, ga in self.host(h).gas.items()
                  if ga.is_frozen]
        while frozen and time.monotonic() < deadline:
            time.sleep(0.05)
            frozen = [f"{h}/{vm}" for h in self.hosts()
                      for vm, ga in self.host(h).gas.items() if ga.is_frozen]
        if frozen:
            self.fail(f"before txn {i}: {frozen} still frozen {FREEZE_TIMEOUT + 5:.0f}s "
                      "after the last transaction ended")

    def wait_agents(self, i: int, timeout: float = 60) -> None:
        """Every agent registered, live, with every VM connected."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                listed = self.stub().ListAgents(cpb.ListAgentsRequest(), timeout=5).agents
                ready = {a.agent_id for a in listed if a.live and len(a.inventory.vms)
                         == self.o.vms and all(v.connected for v in a.inventory.vms)}
                if ready >= set(self.hosts()):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        self.fail(f"before txn {i}: not every agent live with its VMs after {timeout:.0f}s")

    # --------------------------------------------------------------- samples
    def listed(self) -> list[str]:
        sets = self.stub().ListBackupSets(cpb.ListBackupSetsRequest(), timeout=30).sets
        return [s.set_id for s in sets]

    def images(self, h: str) -> list[apb.MemberImage]:
        return list(self.host(h).stub.ListImages(apb.ListImagesRequest(), timeout=30).images)

    def files(self, h: str) -> set[str]:
        repo = self.host(h).agent.repo
        return {str(p.relative_to(repo)) for p in (repo / "images").rglob("*") if p.is_file()}

    def settled(self) -> tuple[bool, str]:
        """The automatic prune of the last commit is done: the listed sets are a fixed
        point of the policy and every agent holds exactly their images."""
        listed = self.listed()
        kept = {v.set_id for v in retention.plan(self.infos(listed), self.policy) if v.keep}
        if kept != set(listed):
            return False, f"policy would still remove {sorted(set(listed) - kept)}"
        for h in self.hosts():
            images = self.images(h)
            extra = {i.set_id for i in images} - set(listed)
            if extra:
                return False, f"{h} still holds images of {sorted(extra)}"
            files = self.files(h)
            if files != {i.image for i in images}:
                return False, (f"{h}: files outside its catalog "
                               f"{sorted(files - {i.image for i in images})[:4]}, catalog "
                               f"images without a file "
                               f"{sorted({i.image for i in images} - files)[:4]}")
        return True, ""

    def settle(self, what: str) -> None:
        deadline = time.monotonic() + SETTLE
        why = ""
        while time.monotonic() < deadline:
            try:
                ok, why = self.settled()
            except grpc.RpcError as err:
                ok, why = False, f"{err.code()} {err.details()}"
            if ok:
                return
            time.sleep(0.25)
        self.fail(f"{what}: the prune did not settle in {SETTLE:.0f}s: {why}")

    def infos(self, set_ids: list[str]) -> list[retention.SetInfo]:
        disks = frozenset(f"{h}/{vm}/{d}" for h, vm, d in self.disks())
        return [retention.SetInfo(s, self.created[s], disks) for s in set_ids
                if s in self.created]

    def measure(self, i: int, rate: float) -> dict[str, float]:
        c = self.c
        row: dict[str, float] = {
            "txns": i, "elapsed_s": round(time.monotonic() - self.started, 1),
            "clock_days": round(i * self.o.hours / 24, 2),
            "committed": self.tally.committed, "aborted": self.tally.aborted,
            "faults": sum(n for (k, _), n in self.tally.outcomes.items() if k != "none"),
            "txns_per_s": round(rate, 3), "kept_sets": len(self.listed()),
            "prune_wait_s_mean": round(statistics.fmean(self.prune_wait), 3)
            if self.prune_wait else 0.0,
            "prune_wait_s_max": round(max(self.prune_wait, default=0.0), 3)}
        self.prune_wait = []
        held: set[str] = set()
        for h in self.hosts():
            host = self.host(h)
            row[f"repo_bytes_{h}"] = probe.du_bytes(host.agent.repo)
            images = self.images(h)
            row[f"catalog_rows_{h}"] = len(images)
            held |= {i.set_id for i in images}
        # sets some agent still holds that the policy no longer keeps (a prune behind)
        row["prune_backlog_sets"] = len(held) - len(
            [v for v in retention.plan(self.infos(sorted(held)), self.policy) if v.keep])
        etcd = probe.etcd_facts(c.etcd.endpoint)
        row.update({"etcd_db_bytes": etcd.db_bytes, "etcd_db_in_use_bytes": etcd.db_in_use_bytes,
                    "etcd_revision": etcd.revision, "etcd_keys": etcd.keys})
        row.update({f"etcd_keys_{k}": n for k, n in etcd.by_kind.items()})
        row["etcd_dir_bytes"] = probe.du_bytes(c.etcd.data_dir)  # info: WAL + snapshots + db
        coord = c.coordinators[0].proc
        row["coordinator_rss_kib"] = probe.rss_kib(coord.pid if coord else None)
        row["coordinator_fds"] = probe.fds(coord.pid if coord else None)
        for h in self.hosts():
            agent = self.host(h).agent.proc
            row[f"agent_rss_kib_{h}"] = probe.rss_kib(agent.pid if agent else None)
            row[f"agent_fds_{h}"] = probe.fds(agent.pid if agent else None)
        row["etcd_rss_kib"] = probe.rss_kib(c.etcd.proc.pid if c.etcd.proc else None)
        row["qemu_leftover_nodes"] = sum(len(self.leftover_nodes(h, vm)) for h in self.hosts()
                                         for vm in self.host(h).vms)
        row["qemu_rss_kib_max"] = max(probe.rss_kib(vm.pid) for h in self.hosts()
                                      for vm in self.host(h).vms.values())
        return row

    # ---------------------------------------------------------------- checks
    def check_retention(self, what: str) -> list[str]:
        listed = self.listed()
        unknown = set(listed) - set(self.created)
        if unknown:
            self.fail(f"{what}: listed sets this run never committed: {sorted(unknown)}")
        if len(listed) > MAX_KEPT:
            self.fail(f"{what}: {len(listed)} sets kept, the policy keeps at most {MAX_KEPT}")
        wanted = {v.set_id for v in retention.plan(self.infos(list(self.created)),
                                                   self.policy) if v.keep}
        if wanted - set(listed):
            self.fail(f"{what}: sets the policy keeps were removed: "
                      f"{sorted(wanted - set(listed))}")
        if set(listed) - wanted:
            self.notes.append(f"{what}: kept beyond the policy over all sets ever: "
                              f"{sorted(set(listed) - wanted)}")
        return listed

    def check_removed(self, what: str, listed: list[str]) -> None:
        """Every set this run committed and no longer listed: GetBackupSet NOT_FOUND, in
        no agent's catalog, no image file of it on any agent (its cut copy goes too)."""
        removed = set(self.created) - set(listed) - self.gone_checked
        if not removed:
            return
        held = {h: {i.set_id for i in self.images(h)} for h in self.hosts()}
        files = {h: self.files(h) for h in self.hosts()}
        for s in sorted(removed):
            try:
                self.stub().GetBackupSet(cpb.GetBackupSetRequest(set_id=s), timeout=10)
                self.fail(f"{what}: removed set {s} still answers GetBackupSet")
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    self.fail(f"{what}: GetBackupSet of removed set {s}: {err.code()}")
            for h in self.hosts():
                if s in held[h]:
                    self.fail(f"{what}: removed set {s} still in {h}'s catalog")
                left = [f for f in files[h] if s in f]
                if left:
                    self.fail(f"{what}: removed set {s} left files on {h}: {left}")
            shutil.rmtree(self.cuts / s, ignore_errors=True)
            self.gone_checked.add(s)

    def check_leftovers(self, what: str) -> None:
        """Nothing that nothing owns: no btx jobs or nodes in QEMU, each disk's bitmaps
        only the newest committed checkpoint, no image outside the catalog (settle),
        nothing else in the repository, no restore left behind, no open transaction."""
        want = {f"blocktxn:{self.last_committed}"} if self.last_committed else set()
        for h in self.hosts():
            host = self.host(h)
            for vm, lab in host.vms.items():
                for job in qmp_call(lab.probe_socket, "query-jobs"):
                    self.fail(f"{what}: {h}/{vm}: job left {job}", once=f"job {job.get('id')}")
                for node in self.leftover_nodes(h, vm):
                    self.fail(f"{what}: {h}/{vm}: node left {node}", once=f"node {node}")
                for n in qmp_call(lab.probe_socket, "query-named-block-nodes", {"flat": True}):
                    if n["node-name"] in self.vm_disks()[vm]:
                        bitmaps = {b["name"] for b in n.get("dirty-bitmaps", []) if "name" in b}
                        if bitmaps != want:
                            self.fail(f"{what}: {h}/{vm}/{n['node-name']}: bitmaps "
                                      f"{sorted(bitmaps)}, want {sorted(want)}")
            repo = host.agent.repo
            other = sorted(p.name for p in repo.iterdir()
                           if p.name not in ("images", "catalog.jsonl", "journal.jsonl"))
            if other:
                self.fail(f"{what}: {h}: unexpected files in the repository: {other}")
            restores = list(host.agent.restore_dir.rglob("*")) \
                if host.agent.restore_dir.exists() else []
            if restores:
                self.fail(f"{what}: {h}: left in the restore dir: {restores[:4]}")
        open_txns = self.stub().ListTransactions(
            cpb.ListTransactionsRequest(open_only=True), timeout=30).transactions
        if open_txns:
            self.fail(f"{what}: open transactions {[t.txn_id for t in open_txns]}")

    def leftover_nodes(self, h: str, vm: str) -> list[str]:
        """The agent's block nodes (btx*) in a VM: none may outlive a transaction."""
        nodes = qmp_call(self.host(h).vms[vm].probe_socket, "query-named-block-nodes",
                         {"flat": True})
        return [str(n["node-name"]) for n in nodes if str(n["node-name"]).startswith("btx")]

    def check_restore(self, what: str, set_id: str) -> None:
        """Every disk of *set_id* restores (Restore on the coordinator) equal to its
        content at the cut; Verify says ok."""
        stub = self.stub()
        for h, vm, d in self.disks():
            expected = self.cuts / set_id / f"{h}-{vm}-{d}.raw"
            out = self.host(h).agent.restore_dir / f"{set_id}-{vm}-{d}.raw"
            try:
                stub.Restore(cpb.CoordinatorRestoreRequest(
                    set_id=set_id, target=f"{h}/{vm}/{d}", destination=str(out)), timeout=120)
                if not expected.exists():
                    self.fail(f"{what}: no cut content recorded for {set_id} {h}/{vm}/{d}")
                elif not images_equal(out, "raw", expected, "raw"):
                    self.fail(f"{what}: {set_id} {h}/{vm}/{d} restores different from its cut")
                self.restored_disks += 1
            except grpc.RpcError as err:
                self.fail(f"{what}: restore {set_id} {h}/{vm}/{d}: {err.code()} "
                          f"{err.details()}")
            finally:
                out.unlink(missing_ok=True)
        try:
            verified = stub.Verify(cpb.CoordinatorVerifyRequest(set_id=set_id), timeout=120)
            if not verified.ok:
                self.fail(f"{what}: verify {set_id}: "
                          f"{[(c.image, c.problem) for c in verified.checks if not c.ok]}")
        except grpc.RpcError as err:
            self.fail(f"{what}: verify {set_id}: {err.code()} {err.details()}")
        self.restored_sets.add(set_id)

    def checkpoint(self, i: int, rate: float, final: bool = False) -> None:
        what = "end" if final else f"at {i}"
        row = self.measure(i, rate)  # as it is right after a backup: pruning may lag
        self.rows.append(row)
        report.write_csv(self.o.out / "soak.csv", self.rows)
        if not final:
            self.plot()
        self.settle(what)
        listed = self.check_retention(what)
        self.check_removed(what, listed)
        self.check_leftovers(what)
        if final:
            sample = listed
        else:
            newest = max(listed, key=lambda s: self.created.get(s, 0), default=None)
            others = [s for s in listed if s != newest]
            sample = ([newest] if newest else []) + ([self.rng.choice(others)] if others else [])
        for s in sample:
            self.check_restore(what, s)
        mib = 1 << 20
        print(f"[{time.strftime('%H:%M:%S')}] {i:5d} txns  {row['clock_days']:6.1f} days  "
              f"{rate:5.2f} txn/s  commit {self.tally.committed} abort {self.tally.aborted}  "
              f"sets {len(listed)} (+{int(row['prune_backlog_sets'])} to remove)  repo "
              + "/".join(f"{row[f'repo_bytes_{h}'] / mib:.0f}" for h in self.hosts())
              + f" MiB  rows {'/'.join(str(int(row[f'catalog_rows_{h}'])) for h in self.hosts())}"
              f"  etcd {row['etcd_db_bytes'] / mib:.1f} MiB {int(row['etcd_keys'])} keys  "
              f"rss coord {row['coordinator_rss_kib'] / 1024:.0f} agents "
              + "/".join(f"{row[f'agent_rss_kib_{h}'] / 1024:.0f}" for h in self.hosts())
              + f" MiB  failures {len(self.failures)}", flush=True)

    # ------------------------------------------------------------------- run
    def run(self) -> None:
        self.setup()
        window_start, window_txns, checked = time.monotonic(), 0, 0
        i = 0
        for i in range(1, self.o.transactions + 1):
            try:
                self.one(i)
            except (TimeoutError, grpc.RpcError, OSError, RuntimeError) as err:
                self.fail(f"txn {i}: {type(err).__name__}: {err}")
            window_txns += 1
            if i % self.o.every == 0 or i == self.o.transactions:
                rate = window_txns / max(1e-6, time.monotonic() - window_start)
                self.checkpoint(i, rate)
                checked = i
                window_start, window_txns = time.monotonic(), 0
            if len(self.failures) >= MAX_FAILURES:
                self.fail(f"stopping after {i} transactions: too many failures")
                break
        for h in self.hosts():
            for wl in self.host(h).workloads.values():
                wl.stop_background()
        last_rate = self.rows[-1]["txns_per_s"] if self.rows else 0.0
        if checked != i:
            self.checkpoint(i, window_txns / max(1e-6, time.monotonic() - window_start))
            last_rate = self.rows[-1]["txns_per_s"]
        print("final checks: writers stopped, every kept set restored and verified", flush=True)
        before = len(self.rows)
        self.checkpoint(i, last_rate, final=True)
        del self.rows[before:]  # the end's sample repeats the last one (writers stopped)
        report.write_csv(self.o.out / "soak.csv", self.rows)

    def plot(self) -> None:
        """The curves so far (the PNG is redrawn at every sample)."""
        t = self.tally
        done = t.committed + t.aborted
        title = (f"blocktxn soak: {done} transactions ({t.committed} committed, {t.aborted} "
                 f"aborted), {done * self.o.hours / 24:.0f} simulated days, "
                 f"{(time.monotonic() - self.started) / 60:.0f} min, seed {self.o.seed}")
        verdicts = [report.judge(c, self.rows) for c in report.curves(self.hosts())]
        try:
            report.plot(self.o.out / "soak.png", self.rows, verdicts, title)
        except Exception as err:  # a plot that fails must not hide the verdict
            self.fail(f"plot: {type(err).__name__}: {err}")

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()

    def keep_logs(self) -> None:
        dest = self.o.out / "logs"
        for log in self.workdir.rglob("*.log"):
            target = dest / log.relative_to(self.workdir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, target)


def main(opts: Options) -> int:
    import tempfile

    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "soak-txns.jsonl").unlink(missing_ok=True)
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="blocktxn-soak-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    soak = Soak(opts, workdir)
    print(f"soak: {opts.transactions} transactions, seed {opts.seed}, {opts.agents} agents x "
          f"{opts.vms} VMs x {opts.disks} disks of {opts.disk_mib} MiB, {opts.hours:g} h per "
          f"transaction, faults {opts.fault_rate:.0%}, policy {GROUP}="
          + ",".join(f"{k}={v}" for k, v in POLICY.items()) + f", workdir {workdir}",
          flush=True)
    crashed = ""
    try:
        soak.run()
    except KeyboardInterrupt:
        crashed = "interrupted"
    except Exception as err:  # report whatever broke the run itself, then clean up
        import traceback

        traceback.print_exc()
        crashed = f"{type(err).__name__}: {err}"
    finally:
        soak.close()
    verdicts = [report.judge(c, soak.rows) for c in report.curves(soak.hosts())]
    ok = summarize(soak, verdicts, crashed)
    if not ok:
        soak.keep_logs()
    if not opts.keep_files and not opts.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def summarize(soak: Soak, verdicts: list[report.Verdict], crashed: str) -> bool:
    o, t = soak.o, soak.tally
    elapsed = time.monotonic() - soak.started
    done = t.committed + t.aborted
    title = (f"blocktxn soak: {done} transactions ({t.committed} committed, {t.aborted} "
             f"aborted), {done * o.hours / 24:.0f} simulated days, {elapsed / 60:.0f} min, "
             f"seed {o.seed}")
    if soak.rows:
        soak.plot()
    faults = Counter(k for (k, _), n in t.outcomes.items() for _ in range(n) if k != "none")
    print()
    print("=" * 78)
    print(title)
    print(f"duration {elapsed:.0f}s, {done / max(elapsed, 1e-6):.2f} txn/s overall "
          "(checks included)")
    print("faults injected: " + (", ".join(f"{k} {faults[k]}" for k in FAULTS) or "none")
          + f" ({sum(faults.values())} of {done})")
    print("outcomes: " + ", ".join(f"{k}->{v} {n}" for (k, v), n in sorted(t.outcomes.items())))
    for note in dict.fromkeys(soak.notes):
        print(f"note: {note}")
    print(f"anomalies (product races, counted, not failures): {len(soak.anomalies)}")
    for _, what in soak.anomalies[:10]:
        print(f"  {what}")
    repeated = {k: n for k, n in soak.seen.items() if n > 1}
    if repeated:
        print(f"leftovers seen again at later checks: {repeated}")
    print(f"restored and compared with the cut: {soak.restored_disks} disks of "
          f"{len(soak.restored_sets)} sets (each verified); removed sets checked gone "
          f"everywhere: {len(soak.gone_checked)}")
    print(report.RULE)
    print(report.table(verdicts))
    grows = [v.curve.label for v in verdicts if v.ok is False]
    short = [v.curve.label for v in verdicts if v.ok is None]
    plateau_ok = not grows and not short
    if o.plateau == "enforce":
        print(f"plateau: {'every curve plateaus' if plateau_ok else 'NOT every curve'}"
              + (f"; grows: {grows}" if grows else "") + (f"; too short: {short}" if short
                                                          else ""))
    else:
        print(f"plateau (reported, not enforced: --plateau report): grows {grows or 'none'}")
    bound_fail = check_bounds(soak)
    print(f"bounds from the policy (<= {MAX_KEPT} sets): " + ("ok" if not bound_fail
                                                             else "; ".join(bound_fail)))
    if crashed:
        print(f"the run itself failed: {crashed}")
    print(f"failures: {len(soak.failures)}")
    for f in soak.failures[:30]:
        print(f"  {f}")
    ok = (not soak.failures and not crashed and not bound_fail and t.committed > 0
          and (plateau_ok or o.plateau != "enforce"))
    if soak.rows:
        print(f"csv: {o.out / 'soak.csv'}  png: {o.out / 'soak.png'}")
    print(f"soak: {'PASS' if ok else 'FAIL'}")
    return ok


def check_bounds(soak: Soak) -> list[str]:
    """Repository bytes and catalog rows per agent stay within what the policy allows:
    at most MAX_KEPT sets (+1 committed but not pruned yet), each an image of every disk
    of the agent no larger than the disk (qcow2 metadata: +1 MiB per image), plus 4 MiB
    of catalog and journal."""
    o = soak.o
    per_agent = o.vms * o.disks
    rows_max = (MAX_KEPT + 1) * per_agent
    bytes_max = (MAX_KEPT + 1) * per_agent * ((o.disk_mib + 1) << 20) + (4 << 20)
    out = []
    for r in soak.rows:
        for h in soak.hosts():
            if r.get(f"catalog_rows_{h}", 0) > rows_max:
                out.append(f"at {r['txns']:.0f}: {h} catalog {r[f'catalog_rows_{h}']:.0f} rows "
                           f"> {rows_max}")
            if r.get(f"repo_bytes_{h}", 0) > bytes_max:
                out.append(f"at {r['txns']:.0f}: {h} repository "
                           f"{r[f'repo_bytes_{h}'] / 2**20:.0f} MiB > {bytes_max / 2**20:.0f}")
    return out[:10]
