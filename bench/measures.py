"""What the scale benchmarks measure and report: etcd's sizes, a process' CPU and
memory, each backup's figures (``Measured``), a fleet size's (``Case``), a run's
(``Result``), the warning lines of the daemons' logs, and the printed table."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aetcd.utils import prefix_range_end

from bench.report import Row
from blocktxn.coordinator.encoding import final_write_bound
from blocktxn.coordinator.parts import requests
from blocktxn.coordinator.store import PREFIX, Store
from blocktxn.v1 import coordinator_pb2 as cpb

S = TypeVar("S", bound=tuple[Any, ...])  # a process' row: (parent pid, ...)

#: the coordinator's targets the benchmarks report against (never asserted)
DECISION_TARGET = 2.0        # s from the last vote to the durable decision
RSS_TARGET = 200e6           # bytes of coordinator resident memory
VALUE_TARGET = 64 << 10      # bytes of the largest etcd value
REQUEST_TARGET = 1 << 20     # bytes of the largest etcd request
#: metrics given with their ratio to the baseline's (and every "... CPU")
RATIO = ("wall", "cut", "votes after cut", "decision after last vote", "done after decision",
         "largest etcd value", "final write (record + set)", "etcd revisions")



class LoopLag:
    """The longest this process' event loop was late (a benchmark too busy to answer
    in time would show here, not in the coordinator)."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.05)
            self.worst = max(self.worst, time.perf_counter() - t0 - 0.05)

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass(frozen=True)
class EtcdSizes:
    largest: int          # the largest value under /blocktxn/
    largest_key: str
    final_write: int      # the largest request of the transactions' final write
    bound: int            # the coordinator's up-front bound of that write
    db_size: int
    revision: int


async def written_since(store: Store, revision: int) -> list[str]:
    """The keys under /blocktxn/ put after *revision* (deletions do not show), each
    with its revision: what an idle stretch wrote, when it should have written nothing."""
    start = PREFIX.encode()
    kvs = await store._range("bench", start, prefix_range_end(start))
    return [f"{bytes(kv.key).decode()}@{int(kv.mod_revision)}" for kv in kvs
            if int(kv.mod_revision) > revision]


def proc_table(read: Callable[[int], S]) -> tuple[dict[int, S], dict[int, list[int]]]:
    """*read(pid)* (a tuple that starts with the parent pid) of every live process (one
    that vanished meanwhile left out), and each pid's children: what the benchmarks
    walk a process tree with."""
    table: dict[int, S] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                table[int(entry)] = read(int(entry))
            except (OSError, ValueError):
                continue
    children: dict[int, list[int]] = {}
    for pid, row in table.items():
        children.setdefault(int(row[0]), []).append(pid)
    return table, children


def proc_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds: user + system, peak resident bytes: VmHWM) of process *pid*."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])
    hwm = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text()
               .splitlines() if line.startswith("VmHWM:"))
    return ticks / os.sysconf("SC_CLK_TCK"), hwm * 1024


async def etcd_sizes(store: Store, txn_ids: Sequence[str]) -> EtcdSizes:
    """The largest value under the prefix, and of *txn_ids* the largest request of a
    final write as the store makes it (every part of the record and its set written,
    then both headers: coordinator/parts.py) with the coordinator's bound of it."""
    start = PREFIX.encode()
    kvs = await store._range("bench", start, prefix_range_end(start))
    values = {bytes(kv.key).decode(): bytes(kv.value) for kv in kvs}
    key, value = max(values.items(), key=lambda kv: len(kv[1]))
    final = bound = 0
    for txn_id in txn_ids:
        heads = [f"{PREFIX}txn/{txn_id}", f"{PREFIX}set/{txn_id}"]
        owned = (f"{PREFIX}member/{txn_id}/", f"{PREFIX}image/{txn_id}/")
        sizes = [len(k) + len(v) for k, v in values.items() if k.startswith(owned)]
        final = max(final, *requests(
            sizes, sum(len(k) + len(values.get(k, b"")) for k in heads), 2))
        record = await store.get_txn(txn_id)
        if record is not None:
            bound = max(bound, final_write_bound(record))
    status = await store.status()
    return EtcdSizes(len(value), key, final, bound, status.db_size, status.revision)


@dataclass
class Measured:
    """One kind of transaction (full, incr1, ...) of one case: maybe split into several
    transactions run at once (when one would not fit etcd's request limit)."""

    kind: str
    wall: float
    txns: list[cpb.Transaction]
    committed_disks: int          # committed, in the mode asked for
    cpu: dict[str, float]         # role -> CPU seconds used meanwhile
    rss: dict[str, int]           # role -> resident bytes (coordinator: its peak)
    lag: float                    # this process' worst event-loop delay
    heartbeat: float | None       # the slowest heartbeat round trip meanwhile (if timed)
    refused: int                  # starts refused because an agent was lost
    revisions: int                # etcd revisions meanwhile
    sizes: EtcdSizes

    def metrics(self) -> list[tuple[str, float, str]]:
        """(metric, value, unit) of every value measured."""
        t = self.txns
        last_vote = [max((v.at for v in x.votes), default=x.cut_done_at) for x in t]
        pairs = list(zip(last_vote, t, strict=True))
        return [
            ("wall", self.wall * 1000, "ms"),
            ("cut", max(x.cut_done_at - x.created_at for x in t) * 1000, "ms"),
            ("votes after cut", max(v - x.cut_done_at for v, x in pairs) * 1000, "ms"),
            ("decision after last vote", max(x.decided_at - v for v, x in pairs) * 1000, "ms"),
            ("done after decision", max(x.done_at - x.decided_at for x in t) * 1000, "ms"),
            ("transactions", len(t), "txns"),
            ("committed disks", self.committed_disks, "disks"),
            ("starts refused (agent lost)", self.refused, "txns"),
            *([("heartbeat round trip (max)", self.heartbeat * 1000, "ms")]
              if self.heartbeat is not None else []),
            *((f"{role} CPU", cpu, "s") for role, cpu in self.cpu.items()),
            *((f"{role} RSS", rss / 1e6, "MB") for role, rss in self.rss.items()),
            ("bench loop lag (max)", self.lag * 1000, "ms"),
            ("etcd revisions", self.revisions, "revisions"),
            ("largest etcd value", self.sizes.largest, "bytes"),
            ("final write (record + set)", self.sizes.final_write, "bytes"),
            ("final write bound", self.sizes.bound, "bytes"),
            ("etcd db size", self.sizes.db_size / 1e6, "MB"),
        ]


@dataclass
class Case:
    name: str                                   # e.g. sim-100x10
    agents: int
    disks: int
    measured: list[Measured] = field(default_factory=list)
    # None: not measured (the case failed before)
    register_s: float | None = None
    idle: dict[str, float] = field(default_factory=dict)   # metric -> value, heartbeats only
    not_live: int = 0                           # most agents seen not live
    warnings: int = 0                           # agents' warning lines meanwhile

    def rows(self, section: str, baseline: Case | None) -> list[Row]:
        base = {(m.kind, k): v for m in (baseline.measured if baseline else [])
                for k, v, _ in m.metrics()}
        out = [Row(section, self.name, "registration", self.register_s, "s")
               ] if self.register_s is not None else []
        out += [Row(section, self.name, f"idle: {metric}", value, IDLE_UNITS.get(metric, ""))
                for metric, value in self.idle.items()]
        out += [Row(section, self.name, "agents not live (most)", self.not_live, "agents"),
                Row(section, self.name, "agent warnings", self.warnings, "lines")]
        for m in self.measured:
            for metric, value, unit in m.metrics():
                was = base.get((m.kind, metric))
                wanted = metric in RATIO or metric.endswith(" CPU")
                ratio = value / was if was and value and wanted else None
                out.append(Row(section, self.name, f"{m.kind}: {metric}", float(value), unit,
                               baseline.name if ratio is not None and baseline else "",
                               ratio))
        return out


IDLE_UNITS = {"coordinator CPU": "s/min", "etcd revisions": "1/min",
              "etcd revisions per agent": "1/min", "etcd db growth": "bytes/min",
              "heartbeat round trip (max)": "ms"}


@dataclass
class Result:
    section: str
    cases: list[Case]
    notes: list[str]
    live: list[tuple[float, int]] = field(default_factory=list)  # (s since start, live)

    @property
    def rows(self) -> list[Row]:
        base = self.cases[0]
        return [*base.rows(self.section, None),
                *(r for c in self.cases[1:] for r in c.rows(self.section, base))]



def bad_lines(paths: Sequence[Path]) -> list[str]:
    """Every WARNING, ERROR and traceback line of the logs at *paths*."""
    out = []
    for path in paths:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        out += [ln for ln in lines if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]
    return out


def distinct(lines: Sequence[str], most: int = 5) -> list[str]:
    """The first *most* distinct messages of log *lines* (timestamps cut off)."""
    seen: list[str] = []
    for ln in lines:
        text = ln.split(" ", 3)[-1][:160]
        if text not in seen:
            seen.append(text)
    return seen[:most]


def log_notes(who: str, paths: Sequence[Path]) -> list[str]:
    """The warnings and errors of *who*'s logs: how many, and the first few."""
    bad = bad_lines(paths)
    if not bad:
        return [f"{who} log: no warning or error"]
    return [f"{who} log: {len(bad)} warning/error lines; first: " + " | ".join(distinct(bad))]


# ------------------------------------------------------------------------- table


def table(result: Result, title: str) -> str:
    base, *rest = result.cases
    big = rest[-1] if rest else base
    rows = {r.metric: r for r in big.rows(result.section, base if rest else None)}
    base_rows = {r.metric: r for r in base.rows(result.section, None)}
    width = max(len(m) for m in rows) + 2
    out = [title,
           f"{'metric':<{width}}{'unit':>10}{base.name:>16}{big.name:>16}{'ratio':>9}"]
    for metric, r in rows.items():
        b = base_rows.get(metric)
        out.append(f"{metric:<{width}}{r.unit:>10}{_num(b.value if b else math.nan):>16}"
                   f"{_num(r.value):>16}{f'{r.ratio:.2f}x' if r.ratio is not None else '':>9}")
    out += ["", f"targets ({big.name}):"]

    def worst(suffix: str) -> float:
        return max((r.value for m, r in rows.items() if m.endswith(suffix)), default=math.nan)

    for what, got, target, unit in (
            ("decision after the last vote", worst("decision after last vote") / 1000,
             DECISION_TARGET, "s"),
            ("coordinator peak RSS", worst("coordinator RSS"), RSS_TARGET / 1e6, "MB"),
            ("largest etcd value", worst("largest etcd value") / 2**10,
             VALUE_TARGET / 2**10, "KiB"),
            ("largest etcd request (final write)", worst("final write (record + set)") / 2**10,
             REQUEST_TARGET / 2**10, "KiB")):
        verdict = "not measured" if math.isnan(got) else "met" if got <= target else "NOT met"
        out.append(f"  {what}: {got:.3f} {unit} (target <= {target:g} {unit}): {verdict}")
    out += ["", "notes:", *(f"  {n}" for n in result.notes)]
    return "\n".join(out)


def _num(v: float) -> str:
    if math.isnan(v):
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"

