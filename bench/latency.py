"""Section ``latency``: one backup transaction with zero dirty data (an incremental
after a base), median over reps, against both floors (``bench.floors``) measured rep by
rep in turn with it on a qemu-storage-daemon with the same disks.

Paths: the agent alone (``Host``: Cut, Thaw, Prepare, Commit over gRPC), and the
coordinator (``Cluster``: StartTransaction, then WatchTransaction until done) with 1,
2 or 4 agents, the disks split evenly among them (one VM per agent). For the
coordinator the transaction record says where the time went: created → cut done →
last vote → decided → done (coordinator clock).

Section ``chain``: the same through the coordinator (8 disks, 1 agent) after K
earlier incrementals of the same disks: nothing may grow with the number of backups,
so latency(K) / latency(0) should stay near 1.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb
from tests.integration.cluster import Cluster
from tests.integration.harness import Host

from .floors import Floors
from .report import Row, median, ratio

CHAIN_DISKS = 8


@dataclass(frozen=True)
class Plan:
    disks: tuple[int, ...]
    agents: tuple[int, ...]
    reps: int
    chain: tuple[int, ...]  # K: earlier incrementals before each measured window


def plan(quick: bool) -> Plan:
    if quick:
        return Plan(disks=(2, 8), agents=(1, 2), reps=3, chain=(0, 10))
    return Plan(disks=(2, 8, 32), agents=(1, 2, 4), reps=10, chain=(0, 20, 60))


def disk_names(n: int) -> list[str]:
    return [f"d{i}" for i in range(n)]


@dataclass
class Samples:
    product: list[float]
    grouped: list[float]
    durable: list[float]


def interleave(runner: asyncio.Runner, floors: Floors, product: Callable[[], float],
               reps: int, warmup: int = 1) -> Samples:
    """*reps* of the product and of both floors, in turn (the machine's load drifts
    alike for all three); the first *warmup* reps are not counted."""
    s = Samples([], [], [])
    for i in range(warmup + reps):
        g = runner.run(floors.grouped())
        d = runner.run(floors.durable())
        p = product()
        if i >= warmup:
            s.grouped.append(g)
            s.durable.append(d)
            s.product.append(p)
    return s


def case_rows(section: str, case: str, s: Samples) -> list[Row]:
    p, g, d = median(s.product), median(s.grouped), median(s.durable)
    return [Row(section, case, "floor_grouped", g, "ms"),
            Row(section, case, "floor_durable", d, "ms"),
            Row(section, case, "median", p, "ms", "floor_grouped", ratio(p, g)),
            Row(section, case, "median", p, "ms", "floor_durable", ratio(p, d))]


def agent_txn(host: Host, vm: str, disks: list[str], txn: str) -> float:
    t0 = time.perf_counter()
    vote = host.backup(txn, [(vm, d) for d in disks], quiesce=apb.QUIESCE_NONE,
                       mode=apb.BACKUP_MODE_INCREMENTAL)
    elapsed = (time.perf_counter() - t0) * 1000
    if not vote.yes:
        raise RuntimeError(f"{txn}: the agent voted NO: {vote.reason}")
    return elapsed


def add_hosts(cluster: Cluster, hosts: dict[str, dict[str, list[str]]], **kw: Any) -> None:
    """Start lab hosts side by side (each waits for its VMs and its agent), then wait
    until every one has registered."""
    with ThreadPoolExecutor(len(hosts)) as pool:
        for f in [pool.submit(cluster.add_host, h, vms, **kw) for h, vms in hosts.items()]:
            f.result()
    cluster.wait_registered(len(hosts))


class AgentCase:
    """Zero-dirty incrementals of one VM's disks through the agent alone."""

    def __init__(self, host: Host, vm: str, disks: list[str]) -> None:
        self.host, self.vm, self.disks = host, vm, disks
        self.count = 0

    def __call__(self) -> float:
        self.count += 1
        return agent_txn(self.host, self.vm, self.disks, f"lat-{self.vm}-{self.count}")


def coordinator_txn(cluster: Cluster, targets: list[str],
                    mode: apb.BackupMode.ValueType = apb.BACKUP_MODE_INCREMENTAL,
                    **kw: object) -> tuple[float, cpb.Transaction]:
    """ms from StartTransaction to the watched record's DONE; the final record."""
    t0 = time.perf_counter()
    txn = cluster.start(targets, mode=mode, **kw)
    done = txn
    for update in cluster.any_stub().WatchTransaction(
            cpb.GetTransactionRequest(txn_id=txn.txn_id), timeout=120):
        done = update
    elapsed = (time.perf_counter() - t0) * 1000
    if done.phase != cpb.TXN_PHASE_DONE or done.decision != cpb.DECISION_COMMIT:
        raise RuntimeError(f"{txn.txn_id}: not committed: {done.reason or done.phase}")
    return elapsed, done


def phases(record: cpb.Transaction) -> dict[str, float]:
    """ms of each stretch of a finished transaction, from its record."""
    last_vote = max((v.at for v in record.votes), default=record.cut_done_at)
    return {"phase_cut": (record.cut_done_at - record.created_at) * 1000,
            "phase_thaw_to_votes": (last_vote - record.cut_done_at) * 1000,
            "phase_decide": (record.decided_at - last_vote) * 1000,
            "phase_complete": (record.done_at - record.decided_at) * 1000}


class CoordinatorCase:
    """Transactions of one target list, timed, with their records kept."""

    def __init__(self, cluster: Cluster, targets: list[str]) -> None:
        self.cluster, self.targets = cluster, targets
        self.records: list[cpb.Transaction] = []

    def __call__(self) -> float:
        elapsed, record = coordinator_txn(self.cluster, self.targets)
        self.records.append(record)
        return elapsed

    def phase_rows(self, section: str, case: str, total: float, warmup: int = 1
                   ) -> list[Row]:
        stretches: dict[str, list[float]] = {}
        for record in self.records[warmup:]:
            for name, ms in phases(record).items():
                stretches.setdefault(name, []).append(ms)
        return [Row(section, case, name, median(v), "ms", "median", ratio(median(v), total))
                for name, v in stretches.items()]


def run(work: Path, quick: bool) -> list[Row]:
    """Sections latency and chain."""
    p = plan(quick)
    rows: list[Row] = []
    solo = Host(work / "solo", {f"vm{n}": disk_names(n) for n in p.disks}, agent_id="solo")
    try:
        solo.start_agent()
        with asyncio.Runner() as runner:
            floors = {n: runner.run(Floors.open(solo.vms[f"vm{n}"], work / f"floors{n}"))
                      for n in p.disks}
            try:
                for n in p.disks:
                    vm, disks = f"vm{n}", disk_names(n)
                    solo.backup(f"base{n}", [(vm, d) for d in disks],
                                quiesce=apb.QUIESCE_NONE)
                    s = interleave(runner, floors[n], AgentCase(solo, vm, disks), p.reps)
                    rows += case_rows("latency", f"disks={n} agent", s)
                for a in p.agents:
                    rows += _coordinator(work / f"agents{a}", runner, floors, p, a)
            finally:
                for f in floors.values():
                    runner.run(f.close())
    finally:
        solo.close()
    return rows


def _coordinator(work: Path, runner: asyncio.Runner, floors: dict[int, Floors], p: Plan,
                 agents: int) -> list[Row]:
    rows: list[Row] = []
    sizes = [n for n in p.disks if n >= agents]
    chain = agents == 1 and bool(p.chain)
    cluster = Cluster(work)
    try:
        hosts = {f"h{i}": {f"vm{n}": disk_names(n // agents) for n in sizes}
                 for i in range(1, agents + 1)}
        if chain:
            hosts["h1"]["chain"] = disk_names(CHAIN_DISKS)
        # a chain longer than the default bound (32) must stay incremental
        add_hosts(cluster, hosts, agent_args=["--max-chain", "1000"] if chain else None)
        for n in sizes:
            targets = [f"h{i}/vm{n}" for i in range(1, agents + 1)]
            coordinator_txn(cluster, targets, apb.BACKUP_MODE_AUTO)  # the base (full)
            case = CoordinatorCase(cluster, targets)
            name = f"disks={n} coordinator, {agents} agent{'s' if agents > 1 else ''}"
            s = interleave(runner, floors[n], case, p.reps)
            rows += case_rows("latency", name, s)
            rows += case.phase_rows("latency", name, median(s.product))
        if chain and CHAIN_DISKS in floors:
            rows += _chain(cluster, runner, floors[CHAIN_DISKS], p)
    finally:
        cluster.close()
    return rows


def _chain(cluster: Cluster, runner: asyncio.Runner, floors: Floors, p: Plan) -> list[Row]:
    targets = ["h1/chain"]
    coordinator_txn(cluster, targets, apb.BACKUP_MODE_AUTO)  # the base (full)
    done = 0  # incrementals so far
    rows: list[Row] = []
    first = 0.0
    for k in p.chain:
        while done < k:
            coordinator_txn(cluster, targets)
            done += 1
        case = CoordinatorCase(cluster, targets)
        s = interleave(runner, floors, case, p.reps, warmup=0)
        done += p.reps
        rows += [r for r in case_rows("chain", f"k={k}", s) if r.ratio_to != "floor_grouped"]
        latency = median(s.product)
        if k == p.chain[0]:
            first = latency
        else:
            rows.append(Row("chain", f"k={k}", "median", latency, "ms", f"k={p.chain[0]}",
                            ratio(latency, first)))
    return rows
