"""The scale benchmarks' common part: a real etcd and a real coordinator process, a
fleet of agents on one side (simulated in this process: ``bench.sim``; real
processes: ``bench.scale``), and a measure of each backup of every disk (what is
measured and reported: ``bench.measures``).

A *case* is one fleet size: registration, an idle stretch of heartbeats only, a full
backup of every disk and then zero-change incrementals. The first case of a run is
the one-agent baseline; every other case's figures carry their ratio to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import grpc

from bench.measures import (
    REQUEST_TARGET,
    Case,
    LoopLag,
    Measured,
    Result,
    etcd_sizes,
    log_notes,
    proc_usage,
    written_since,
)
from blocktxn import procs
from blocktxn.coordinator.etcd_server import EtcdServer
from blocktxn.coordinator.store import Store
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb
from blocktxn.v1 import coordinator_pb2_grpc as cpb_grpc
from tests.integration.cluster import CoordinatorProcess

if TYPE_CHECKING:
    from blocktxn.v1.coordinator_pb2_grpc import CoordinatorServiceAsyncStub

START_TIMEOUT = 60.0         # StartTransaction, ListAgents
DEADLINE_S = 600.0           # a transaction's deadline (then presumed abort)
WATCH_TIMEOUT = DEADLINE_S + 60
REGISTER_TIMEOUT = 120.0     # every agent registered
RETRIES = 3                  # starts refused because an agent was lost, per backup
QUIET_S = 7.0                # etcd unchanged this long before an idle stretch (> 2 heartbeats)
QUIET_WAIT = 40.0            # ... waited for at most this long (then measured anyway)


class FleetError(RuntimeError):
    """The run cannot go on: agents that do not register, a backup whose start is
    refused again and again, a watch that ends early. The case ends there (and says why
    in the notes); an aborted transaction is not an error, it is reported."""


class Member(Protocol):
    """One agent of the fleet, as the benchmark addresses it."""

    @property
    def agent_id(self) -> str: ...

    @property
    def targets(self) -> list[str]: ...


class Side(Protocol):
    """The agents' side of a run: what it adds, and what it can say about itself."""

    #: every heartbeat round trip this side timed, in order (may stay empty)
    heartbeats: list[float]

    async def add(self, disks: int, first: bool) -> Member:
        """One more agent with *disks* disks, started and heartbeating."""

    def waiting(self, members: Sequence[Member], since: float) -> int:
        """How many of *members* had no heartbeat accepted since *since*
        (``time.monotonic()``); 0 where this side cannot tell."""

    def usage(self) -> dict[str, tuple[float, int]]:
        """Role -> (CPU seconds so far, resident bytes now) of this side's processes."""

    def warnings(self) -> tuple[int, list[str]]:
        """Warning/error lines this side logged so far, and the first few distinct."""

    async def close(self) -> None: ...


class Bench:
    """A real etcd and a real coordinator process, a client of it, and the agents'
    side (made by *side* from the coordinator's address)."""

    def __init__(self, workdir: Path, side: Callable[[str], Side], idle_s: float,
                 prefix: str) -> None:
        self.workdir = workdir
        self.etcd = EtcdServer(workdir / "etcd", max_request=REQUEST_TARGET)  # refuses more
        self.coordinator = CoordinatorProcess("c0", workdir / "c0", self.etcd.endpoint)
        self.coordinator.prefix = procs.DIE_WITH_PARENT  # nothing outlives a killed bench
        self.side = side(self.coordinator.address)
        self.idle_s, self.prefix = idle_s, prefix
        self.notes: list[str] = []
        self.members: list[Member] = []
        self.live_samples: list[tuple[float, int]] = []
        self._channel: grpc.aio.Channel | None = None
        self._store: Store | None = None
        self._seq = 0
        self._t0 = time.monotonic()
        self._sampler: asyncio.Task[None] | None = None
        self.lag = LoopLag()
        self.last_live = 0  # agents live in the last listing (of any case)

    @property
    def stub(self) -> CoordinatorServiceAsyncStub:
        assert self._channel is not None
        return cpb_grpc.CoordinatorServiceStub(self._channel)

    @property
    def store(self) -> Store:
        assert self._store is not None
        return self._store

    @property
    def pid(self) -> int:
        assert self.coordinator.proc is not None
        return self.coordinator.proc.pid

    async def __aenter__(self) -> Bench:
        self.etcd.start()
        self.coordinator.start()
        self._channel = grpc.aio.insecure_channel(self.coordinator.address)
        self._store = Store(self.etcd.endpoint)
        self.lag.start()
        self._sampler = asyncio.create_task(self._sample_live())
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # serving, and etcd reachable
            try:
                await self.stub.ListAgents(cpb.ListAgentsRequest(), timeout=5)
                return self
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._sampler is not None:
                self._sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._sampler
            await self.lag.stop()
            await self.side.close()
            if self._store is not None:
                await self._store.close()
            if self._channel is not None:
                await self._channel.close(None)
        finally:
            # read before the stop: a replica stopped says it no longer leads
            self.notes += log_notes("coordinator", [self.workdir / "c0" / "c0.log"])
            self.coordinator.stop()
            self.etcd.stop()

    async def _sample_live(self) -> None:
        """Every second: how many of the fleet's agents hold a live key in etcd."""
        while True:
            with contextlib.suppress(Exception):
                ids = {m.agent_id for m in self.members}
                live = await self.store.live_leases()
                self.live_samples.append((time.monotonic() - self._t0,
                                          sum(1 for a in live if a in ids)))
            await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ agents
    async def add(self, disks: int, count: int, first: bool = False) -> list[Member]:
        """Start *count* more agents of *disks* disks each (at most 16 at once)."""
        limit = asyncio.Semaphore(16)

        async def one() -> Member:
            async with limit:
                return await self.side.add(disks, first)

        added = list(await asyncio.gather(*(one() for _ in range(count))))
        self.members += added
        return added

    async def live(self, agents: Sequence[Member]) -> int:
        """How many of *agents* the coordinator lists as live with their inventory, every
        VM of it connected."""
        ids = {a.agent_id for a in agents}
        reply = await self.stub.ListAgents(cpb.ListAgentsRequest(), timeout=START_TIMEOUT)
        self.last_live = sum(1 for a in reply.agents
                             if a.agent_id in ids and a.live and a.inventory.vms
                             and all(v.connected for v in a.inventory.vms))
        return self.last_live

    async def wait_registered(self, agents: Sequence[Member]) -> float:
        """Wait until every agent had a heartbeat accepted since now (where the side
        can tell), then until the coordinator lists them all live."""
        t0 = time.monotonic()
        while True:
            waiting = self.side.waiting(agents, t0)
            if not waiting and await self.live(agents) == len(agents):
                return time.monotonic() - t0
            if time.monotonic() - t0 > REGISTER_TIMEOUT:
                raise FleetError(
                    f"after {REGISTER_TIMEOUT:.0f}s, {waiting} of {len(agents)} agents had "
                    f"no heartbeat accepted, {len(agents) - self.last_live} were not live "
                    "in the coordinator's listing")
            await asyncio.sleep(0.2 if waiting else 2.0)

    def _usage(self) -> tuple[dict[str, float], dict[str, int]]:
        cpu, rss = proc_usage(self.pid)
        etcd_cpu, etcd_rss = proc_usage(self.etcd.proc.pid) if self.etcd.proc else (0.0, 0)
        side = self.side.usage()
        return ({"coordinator": cpu, **{r: c for r, (c, _) in side.items()}, "etcd": etcd_cpu},
                {"coordinator": rss, **{r: m for r, (_, m) in side.items() if m},
                 "etcd": etcd_rss})

    async def idle(self, case: Case) -> None:
        """While the agents only heartbeat: per minute, coordinator CPU, etcd revisions
        (in all and per agent), etcd's growth; the slowest heartbeat round trip. It
        starts once etcd was quiet for QUIET_S (at most QUIET_WAIT s): an agent of an
        earlier case writes its entry once after its last transaction committed (its
        new checkpoint), at its next heartbeat."""
        s0 = await self.store.status()
        quiet = t0 = time.monotonic()
        while time.monotonic() - quiet < QUIET_S and time.monotonic() - t0 < QUIET_WAIT:
            await asyncio.sleep(0.5)
            now = await self.store.status()
            if now.revision != s0.revision:
                s0, quiet = now, time.monotonic()
        cpu0, _ = self._usage()
        beats = len(self.side.heartbeats)
        self.lag.take()
        await asyncio.sleep(self.idle_s)
        cpu1, _ = self._usage()
        s1 = await self.store.status()
        per_min = 60.0 / self.idle_s
        revisions = (s1.revision - s0.revision) * per_min
        if s1.revision > s0.revision:
            written = await written_since(self.store, s0.revision)
            self.notes.append(f"{case.name}: idle revisions {s0.revision}..{s1.revision}, "
                              f"keys put: {', '.join(written) or 'none (deletions)'}")
        case.idle = {"coordinator CPU": (cpu1["coordinator"] - cpu0["coordinator"]) * per_min,
                     "etcd revisions": revisions,
                     "etcd revisions per agent": revisions / max(1, case.agents),
                     "etcd db growth": (s1.db_size - s0.db_size) * per_min}
        slowest = max(self.side.heartbeats[beats:], default=None)
        if slowest is not None:
            case.idle["heartbeat round trip (max)"] = slowest * 1000

    # ------------------------------------------------------------ transactions
    async def start(self, targets: list[str], mode: apb.BackupMode.ValueType
                    ) -> cpb.Transaction | grpc.aio.AioRpcError:
        """Start one transaction; the coordinator's refusal when an agent is lost or the
        transaction could never be decided (too large for one etcd request); nothing
        was started then."""
        self._seq += 1
        req = cpb.StartTransactionRequest(
            request_id=f"{self.prefix}-{self._seq}-{random.getrandbits(32):08x}",
            targets=[cpb.Target(target=t) for t in targets], mode=mode, deadline_s=DEADLINE_S)
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # a fresh coordinator may not lead yet
            try:
                txn: cpb.Transaction = await self.stub.StartTransaction(req,
                                                                         timeout=START_TIMEOUT)
                return txn
            except grpc.aio.AioRpcError as err:
                if _too_large(err) or _lost(err) or _vm_unreachable(err):
                    return err
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def watch(self, txn_id: str) -> cpb.Transaction:
        """Follow the transaction until DONE (as ``blocktxn backup --wait`` does: a
        stream that ends before DONE, e.g. cut by a leader change, is watched again, and
        the notes say so)."""
        last: cpb.Transaction | None = None
        deadline = time.monotonic() + WATCH_TIMEOUT
        while True:
            async for t in self.stub.WatchTransaction(
                    cpb.GetTransactionRequest(txn_id=txn_id),
                    timeout=max(1.0, deadline - time.monotonic())):
                last = t
            if last is not None and last.phase == cpb.TXN_PHASE_DONE:
                return last
            phase = cpb.TxnPhase.Name(last.phase) if last is not None else "none"
            if time.monotonic() > deadline:
                raise FleetError(f"{txn_id}: not DONE after {WATCH_TIMEOUT:.0f}s ({phase})")
            self.notes.append(f"{txn_id}: the watch ended at {phase}, before DONE; "
                              "watched again")
            await asyncio.sleep(0.2)

    async def start_all(self, agents: Sequence[Member], kind: str,
                        mode: apb.BackupMode.ValueType) -> tuple[list[cpb.Transaction], int]:
        """Start one grouped transaction of every disk of *agents*, or, if one could
        never be decided, the fewest equal parts that can (all at once). A start
        refused because an agent is lost, or a VM unreachable, waits until every agent is
        live again with every VM connected and retries (at most RETRIES times). Returns
        the transactions and the refusals for an agent lost."""
        targets = [t for a in agents for t in a.targets]
        parts = refused = vm_refusals = 0
        while True:
            parts = parts or 1
            chunks = [targets[i::parts] for i in range(parts)]
            got = [await self.start(chunks[0], mode)]
            if isinstance(got[0], cpb.Transaction):
                for chunk in chunks[1:]:
                    got.append(await self.start(chunk, mode))
            errors = [e for e in got if isinstance(e, grpc.aio.AioRpcError)]
            txns = [t for t in got if isinstance(t, cpb.Transaction)]
            if not errors:
                if parts > 1:
                    self.notes.append(f"{kind}: run as {parts} transactions at once "
                                      f"({len(chunks[0])} targets each)")
                return txns, refused
            if txns:  # a later part refused: finish what started, report what did not
                self.notes.append(f"{kind}: {len(errors)} of {parts} parts refused: "
                                  f"{errors[0].details()}")
                return txns, refused
            err = errors[0]
            if _too_large(err):
                if parts == 1:
                    self.notes.append(f"{kind}: {len(targets)} targets refused as one "
                                      f"transaction: {err.details()}")
                parts *= 2
                if parts > len(targets):
                    raise FleetError(f"{kind}: refused even per target: {err.details()}")
            else:
                # an agent lost counts against the run ("starts refused (agent lost)"); a
                # VM its agent reports unreachable (its QMP session is being made again)
                # is in the notes only: the start waits for it, as an operator's would
                refused += _lost(err)
                vm_refusals += _vm_unreachable(err)
                self.notes.append(f"{kind}: start refused: {err.details()}")
                if refused + vm_refusals > RETRIES:
                    raise FleetError(f"{kind}: refused {refused + vm_refusals} times: "
                                     f"{err.details()}")
                await self.wait_registered(agents)

    async def backup(self, agents: Sequence[Member], kind: str,
                     mode: apb.BackupMode.ValueType) -> Measured:
        """Back up every disk of *agents* (see start_all); measure it."""
        cpu0, _ = self._usage()
        rev0 = (await self.store.status()).revision
        beats = len(self.side.heartbeats)
        self.lag.take()
        t0 = time.perf_counter()
        started, refused = await self.start_all(agents, kind, mode)
        done = await asyncio.gather(*(self.watch(t.txn_id) for t in started))
        wall = time.perf_counter() - t0
        cpu1, rss = self._usage()
        lag = self.lag.take()
        want = apb.BACKUP_MODE_FULL if mode == apb.BACKUP_MODE_FULL else \
            apb.BACKUP_MODE_INCREMENTAL
        committed = 0
        for t in done:
            if t.decision != cpb.DECISION_COMMIT:
                self.notes.append(f"{kind}: {t.txn_id} ABORTED: {t.reason}")
            wrong = [m for m in t.members if m.outcome == "committed" and m.mode != want]
            if wrong:
                self.notes.append(f"{kind}: {len(wrong)} disks not {apb.BackupMode.Name(want)}"
                                  f", e.g. {wrong[0].mode_reason}")
            committed += sum(1 for m in t.members if m.outcome == "committed" and m.mode == want)
        sizes = await etcd_sizes(self.store, [t.txn_id for t in done])
        return Measured(kind, wall, list(done), committed,
                        {r: cpu1[r] - cpu0.get(r, 0.0) for r in cpu1}, rss, lag,
                        max(self.side.heartbeats[beats:], default=None), refused,
                        sizes.revision - rev0, sizes)

    async def run_case(self, name: str, agents: Sequence[Member], incrementals: int,
                       disks: int) -> Case:
        """Registration, idle heartbeats, then a full backup and *incrementals*
        incrementals of every disk of *agents*; what failed ends the case, in the notes."""
        case = Case(name, len(agents), disks)
        warned, _ = self.side.warnings()
        kinds = [("full", apb.BACKUP_MODE_FULL)] + [
            (f"incr{i + 1}", apb.BACKUP_MODE_INCREMENTAL) for i in range(incrementals)]
        since = math.inf
        try:
            case.register_s = await self.wait_registered(agents)
            since = time.monotonic() - self._t0  # live samples count from here
            await self.idle(case)
            for kind, mode in kinds:
                m = await self.backup(agents, kind, mode)
                case.measured.append(m)
                case.not_live = max(case.not_live, len(agents) - await self.live(agents))
        except FleetError as err:
            self.notes.append(f"{name}: FAILED: {err}")
            case.not_live = max(case.not_live, len(agents) - self.last_live)
        ids = {a.agent_id for a in agents}
        seen = [n for t, n in self.live_samples if t >= since]
        if seen and len(ids) == len(self.members):
            case.not_live = max(case.not_live, len(ids) - min(seen))
        count, first = self.side.warnings()
        case.warnings = count - warned
        if case.warnings:
            self.notes.append(f"{name}: {case.warnings} warning/error lines of agents, "
                              "first: " + " | ".join(first))
        if case.measured:
            largest = max(case.measured, key=lambda m: m.sizes.largest).sizes
            self.notes.append(f"{name}: largest etcd value {largest.largest:,} bytes at "
                              f"{largest.largest_key}")
        return case

    def result(self, section: str, cases: list[Case]) -> Result:
        return Result(section, cases, self.notes, list(self.live_samples))


def _too_large(err: grpc.aio.AioRpcError) -> bool:
    return err.code() == grpc.StatusCode.INVALID_ARGUMENT and \
        "split the targets" in (err.details() or "")


def _vm_unreachable(err: grpc.aio.AioRpcError) -> bool:
    return err.code() == grpc.StatusCode.FAILED_PRECONDITION and \
        "(QEMU unreachable)" in (err.details() or "")


def _lost(err: grpc.aio.AioRpcError) -> bool:
    return err.code() == grpc.StatusCode.FAILED_PRECONDITION and \
        "lost (no heartbeat)" in (err.details() or "")
