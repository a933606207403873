"""SIMULATION: many blocktxn agents in one process, driven by a REAL coordinator process
over a REAL etcd: the coordinator's scale benchmark (issue #11 "scale", issue #16's
simulated-agent mode).

    .venv/bin/python -m bench.sim --agents 100 --disks 10 [--incrementals 3]
    .venv/bin/python -m bench.sim --quick          # 10 agents x 3 disks, 1 incremental
    .venv/bin/python -m bench.sim --measure        # time the real agent (needs QEMU)

What is simulated, and what is not:

- Each simulated agent is the real agent's runner (``AgentRunner``: the participant
  machine, the planner, one lock per transaction), served by the real AgentService
  servicer on its own loopback port and registered by the real heartbeat loop
  (RegisterAgent with its inventory, at the interval the coordinator's reply asks for),
  all of them in this one asyncio loop.
- Only what touches QEMU, the repository and the journal is replaced: each step (cut,
  prepare barrier, commit, abort; thaw and inventory) sleeps for the time the real
  agent's call takes (``MEASURED``, +-``jitter``), and the state a real agent keeps is
  kept in memory: each disk's checkpoint bitmaps, its newest committed image and chain
  length, so the next backup is incremental exactly when a real agent's would be.
- The simulated disks hold no data: a full backup costs what a zero-change incremental
  costs; disk and image sizes are only numbers in the records.
- Quiesce is ``none`` only (there is no guest to freeze).

Everything else is real: the coordinator process (its planner, transaction machine,
fenced etcd writes, gRPC fan-out to every agent), etcd, and the wire between them.
The machine is shared: compare ratios to the 1-agent baseline of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import math
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from aetcd.utils import prefix_range_end

from bench.report import Row
from blocktxn.agent import planner
from blocktxn.agent.backend import Checkpoint, Disk
from blocktxn.agent.config import AgentConfig
from blocktxn.agent.errors import ConflictError, UnknownError
from blocktxn.agent.heartbeat import register_forever
from blocktxn.agent.journal import Journal
from blocktxn.agent.participant import ParticipantMachine, TxnState
from blocktxn.agent.participant_messages import (
    OPEN_PHASES,
    Aborted,
    Committed,
    CutDone,
    Event,
    FinalizeJobs,
    ImageRecord,
    MemberPlan,
    Prepared,
    Rollback,
    Staged,
    TxnPlan,
)
from blocktxn.agent.replicas import Replicas
from blocktxn.agent.runner import AgentRunner
from blocktxn.agent.service import serve
from blocktxn.agent.steps import Steps
from blocktxn.agent.views import DiskStatus, DiskView, VmView
from blocktxn.coordinator.encoding import decode, final_write_bound
from blocktxn.coordinator.etcd_server import EtcdServer
from blocktxn.coordinator.records import TxnRecord
from blocktxn.coordinator.store import ETCD_MAX_REQUEST, PREFIX, Store
from blocktxn.demo.lab import free_port
from blocktxn.requests import DiskRequest, check_cut
from blocktxn.tls import TlsFiles
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb
from blocktxn.v1 import coordinator_pb2_grpc as cpb_grpc
from tests.integration.cluster import CoordinatorProcess
from tests.integration.harness import Host

if TYPE_CHECKING:
    from blocktxn.v1.coordinator_pb2_grpc import CoordinatorServiceAsyncStub

SECTION = "scale (SIMULATED agents)"
VM = "vm1"
DISK_SIZE = 10 << 30        # a simulated disk's virtual size (only a number in records)
DISK_ALLOCATED = 4 << 30    # what a full backup of it reports as copied
#: Seconds each step of the real agent takes: (base, per member disk), from ``--measure``:
#: tests/integration/harness.Host, one VM of 1 and of 8 qcow2 disks on
#: qemu-storage-daemon, quiesce none, zero-change incrementals, medians of 7 reps, the
#: line through the two medians. Each is the whole RPC as the coordinator sees it (gRPC,
#: journal fsyncs, QMP, qemu-img create of the targets at the cut, checksums at the
#: barrier). Measured on this 2-core machine while it ran other tests (load ~11): 8 disks
#: took cut 323, thaw 4, prepare 105, commit 46, abort 73, inventory 27 ms (on a quiet
#: machine the README's bench/txn_latency.py has 98 ms for the whole 8-disk cut..commit).
#: The simulated agent's own handling (~1 ms per call) comes on top.
MEASURED: dict[str, tuple[float, float]] = {
    "inventory": (0.0108, 0.0021),
    "cut": (0.0458, 0.0346),
    "thaw": (0.0016, 0.0003),
    "prepare": (0.0102, 0.0119),
    "commit": (0.0130, 0.0041),
    "abort": (0.0081, 0.0081),
}
#: the coordinator's targets this benchmark reports against (never asserted)
DECISION_TARGET = 2.0        # s from the last vote to the durable decision
RSS_TARGET = 200e6           # bytes of coordinator resident memory
#: the metrics of a transaction given with their ratio to the baseline's
RATIO = ("wall", "cut", "votes after cut", "decision after last vote", "done after decision",
         "coordinator CPU", "simulator CPU", "largest etcd value",
         "final write (record + set)")
START_TIMEOUT = 60.0         # StartTransaction, ListAgents
DEADLINE_S = 600.0           # a transaction's deadline (then presumed abort)
WATCH_TIMEOUT = DEADLINE_S + 60
REGISTER_TIMEOUT = 120.0     # every simulated agent registered
IDLE_S = 5.0                 # seconds of heartbeats only, measured before the backups
RETRIES = 3                  # starts refused because an agent was lost, per backup

log = logging.getLogger(__name__)


class SimulationError(RuntimeError):
    """The simulated run cannot go on: agents that do not register, a backup whose
    start is refused again and again, a watch that ends early. The case ends there (and
    says why in the notes); an aborted transaction is not an error, it is reported."""


@dataclass(frozen=True)
class Delays:
    """How long each simulated step takes: base + per disk, times a random factor in
    [1 - jitter, 1 + jitter] (real agents are not in lockstep)."""

    steps: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(MEASURED))
    jitter: float = 0.2

    def seconds(self, step: str, disks: int, rng: random.Random) -> float:
        base, per_disk = self.steps[step]
        return (base + per_disk * disks) * rng.uniform(1 - self.jitter, 1 + self.jitter)


# ------------------------------------------------------------- the simulated host


@dataclass
class SimDisk:
    """One simulated disk: what QEMU and the catalog hold for it on a real host."""

    name: str
    checkpoints: list[str] = field(default_factory=list)  # its named dirty bitmaps
    last: ImageRecord | None = None  # its newest committed image (the catalog's)
    chain: int = 0                   # images in its newest chain

    def as_disk(self) -> Disk:
        return Disk(self.name, DISK_SIZE, "qcow2",
                    tuple(Checkpoint(c, recording=True, persistent=True, inconsistent=False)
                          for c in self.checkpoints), allocated=DISK_ALLOCATED)


@dataclass
class SimHost:
    """The VMs of one simulated host: vm -> disk name -> disk."""

    vms: dict[str, dict[str, SimDisk]]

    def disk(self, vm: str, disk: str) -> SimDisk:
        return self.vms[vm][disk]

    def last_image(self, vm: str, disk: str) -> ImageRecord | None:
        return self.disk(vm, disk).last

    def chain_length(self, vm: str, disk: str) -> int:
        return self.disk(vm, disk).chain


class SimJournal(Journal):
    """No journal file: the real agent's fsyncs are inside the measured step times."""

    def __init__(self) -> None:  # no file to open
        pass

    def append(self, txn_id: str, event: Event) -> None:
        pass

    def replay(self, machine: ParticipantMachine) -> None:
        pass

    def compact(self, machine: ParticipantMachine, slack: int = 0,
                records: object = None) -> set[str]:
        return set()

    def close(self) -> None:
        pass


class SimSteps(Steps):
    """The participant's commands carried out on a SimHost: each sleeps for the real
    agent's time and changes what QEMU and the repository would."""

    def __init__(self, runner: AgentRunner, host: SimHost, delays: Delays,
                 rng: random.Random) -> None:
        super().__init__({}, runner.repo, runner.freeze)
        self.host, self.delays, self.rng = host, delays, rng

    async def take(self, step: str, disks: int) -> None:
        await asyncio.sleep(self.delays.seconds(step, disks, self.rng))

    async def stage(self, plan: TxnPlan) -> Event:
        """Nothing to create (the cut's measured time covers the stage)."""
        return Staged()

    async def cut(self, plan: TxnPlan) -> Event:
        """Every member's new checkpoint added and its job started (quiesce none)."""
        await self.take("cut", len(plan.members))
        for m in plan.members:
            self.host.disk(m.vm, m.disk).checkpoints.append(m.new_bitmap)
        now = time.time()
        return CutDone(0.0, now, now + plan.freeze_timeout,
                       tuple((m.vm, m.disk, _copied(m)) for m in plan.members))

    async def barrier(self, cmd: FinalizeJobs, cut_at: float) -> Event:
        """Every job copied, every image durable and checksummed: vote YES."""
        await self.take("prepare", len(cmd.members))
        out = {(vm, disk) for vm, disk, _ in cmd.failed}
        return Prepared(tuple(ImageRecord(
            vm=m.vm, disk=m.disk, set_id=cmd.txn_id, image=m.image, backing=m.backing,
            mode=m.mode, bytes=_copied(m), size=m.size, cut_at=cut_at,
            checkpoint=m.new_bitmap, sha256=hashlib.sha256(m.image.encode()).hexdigest())
            for m in cmd.members if m.key not in out), cmd.failed)

    async def publish(self, txn_id: str, members: tuple[MemberPlan, ...],
                      images: tuple[ImageRecord, ...]) -> Event:
        """The previous checkpoints dropped, the images catalogued."""
        await self.take("commit", len(members))
        for m in members:
            disk = self.host.disk(m.vm, m.disk)
            disk.checkpoints = [c for c in disk.checkpoints if c not in m.stale_bitmaps]
        for i in images:
            disk = self.host.disk(i.vm, i.disk)
            disk.last, disk.chain = i, 1 if i.mode == "full" else disk.chain + 1
        return Committed(images)

    async def rollback(self, cmd: Rollback) -> Event:
        """The jobs cancelled, the new checkpoints dropped (the previous ones kept)."""
        await self.take("abort", len(cmd.members))
        for m in cmd.members:
            disk = self.host.disk(m.vm, m.disk)
            disk.checkpoints = [c for c in disk.checkpoints if c != m.new_bitmap]
        return Aborted(cmd.reason)


def _copied(m: MemberPlan) -> int:
    return DISK_ALLOCATED if m.mode == "full" else 0  # zero-change incrementals


class TimedReplicas(Replicas):
    """The agent's real link to the coordinator, timing each heartbeat's round trip
    (RegisterAgent; a failed one counts with the time it took)."""

    def __init__(self, addresses: str, times: list[float]) -> None:
        super().__init__(addresses, TlsFiles())
        self.times = times
        self.registered_at = 0.0  # time.monotonic() of the last accepted heartbeat

    def stub(self) -> Any:
        stub, link = super().stub(), self

        class Timed:
            async def RegisterAgent(self, request: Any, timeout: float) -> Any:
                t0 = time.perf_counter()
                try:
                    reply = await stub.RegisterAgent(request, timeout=timeout)
                    link.registered_at = time.monotonic()
                    return reply
                finally:
                    link.times.append(time.perf_counter() - t0)

        return Timed()


class SimAgent(AgentRunner):
    """One SIMULATED agent: the real runner over a SimHost (see the module docstring)."""

    def __init__(self, agent_id: str, listen: str, workdir: Path, disks: int,
                 coordinator: str, delays: Delays, rng: random.Random,
                 heartbeats: list[float]) -> None:
        super().__init__(AgentConfig(agent_id, listen, workdir / agent_id, vms=(),
                                     coordinator=coordinator))
        self.journal.close()
        self.journal = SimJournal()
        self.host = SimHost({VM: {f"d{i}": SimDisk(f"d{i}") for i in range(disks)}})
        self.sim = SimSteps(self, self.host, delays, rng)
        self.steps = self.sim
        self.server: grpc.aio.Server | None = None
        self.heartbeat: asyncio.Task[None] | None = None
        self.replicas = TimedReplicas(coordinator, heartbeats)

    @property
    def targets(self) -> list[str]:
        return [f"{self.config.agent_id}/{vm}" for vm in self.host.vms]

    async def cut(self, txn_id: str, disks: Sequence[DiskRequest], quiesce: str = "none",
                  freeze_timeout: float = 0.0, individual: bool = False,
                  stage_only: bool = False) -> TxnState:
        check_cut(txn_id, list(disks), quiesce, freeze_timeout)
        for d in disks:
            if d.vm not in self.host.vms:
                raise UnknownError(f"unknown VM {d.vm!r} on agent {self.config.agent_id}")
        if quiesce != "none":
            raise ConflictError(f"quiesce {quiesce}: a simulated agent has no guest")
        return await self._to_the_end(
            self._cut(txn_id, disks, quiesce, freeze_timeout, individual, stage_only))

    async def _facts(self, disks: Sequence[DiskRequest], quiesce: str) -> planner.Facts:
        vms = {d.vm for d in disks}
        return planner.Facts(
            disks={vm: {n: d.as_disk() for n, d in ds.items()}
                   for vm, ds in self.host.vms.items() if vm in vms},
            last_image=self.host.last_image, image_exists=lambda rel: True,
            image_rel=self.repo.image_rel, busy=self.machine.busy_disks(),
            frozen=self.machine.quiesce_holders(), chain_length=self.host.chain_length,
            max_chain=self.config.max_chain)

    async def thaw(self, txn_id: str) -> TxnState:
        await self.sim.take("thaw", 0)
        return await super().thaw(txn_id)

    async def inventory(self) -> list[VmView]:
        disks = sum(len(ds) for ds in self.host.vms.values())
        await self.sim.take("inventory", disks)
        busy = self.machine.busy_disks()
        jobs = {m.key: m.job_id for st in self.machine.txns.values()
                if st.phase in OPEN_PHASES and not st.images for m in st.members}
        views = []
        for vm, ds in self.host.vms.items():
            shown = []
            for d in ds.values():
                state = planner.checkpoint_state(d.as_disk(), d.last, True)
                shown.append(DiskView(d.name, DISK_SIZE, "qcow2", state.checkpoint,
                                      state.usable, state.problem, busy.get((vm, d.name), "")))
            views.append(VmView(vm, True, tuple(shown),
                                tuple(sorted(j for (v, _), j in jobs.items() if v == vm)),
                                frozen=False, has_guest_agent=False))
        return views

    async def status(self, txn_id: str, interval: float
                     ) -> AsyncIterator[tuple[TxnState, list[DiskStatus]]]:
        """One snapshot: a zero-change job is pending at once (the stream then ends)."""
        st = self._known(txn_id)
        images = {(i.vm, i.disk): i for i in st.images}
        disks = []
        for m in st.members:
            image = images.get(m.key)
            total = st.bytes_total.get(m.key, 0)
            disks.append(DiskStatus(m.vm, m.disk, "done", image.bytes, image.bytes, "")
                         if image is not None else
                         DiskStatus(m.vm, m.disk, "pending", total, total, ""))
        yield st, disks

    async def start_serving(self, jitter: float) -> None:
        """Serve AgentService; start heartbeating after up to *jitter* s (real agents do
        not all start in the same second)."""
        self.server = await serve(self, self.config.listen)
        self.heartbeat = asyncio.create_task(self._register(jitter))

    async def _register(self, jitter: float) -> None:
        await asyncio.sleep(jitter)
        await register_forever(self, self.config, self.replicas)

    async def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.heartbeat
        if self.server is not None:
            await self.server.stop(0.5)
        await self.replicas.close()
        await self.stop()


class _Count(logging.Handler):
    """Counts the simulated agents' warnings (a failed heartbeat is one)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.first: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.first) < 5:
            self.first.append(record.getMessage()[:200])


class Simulation:
    """The simulated agents of one run, in this process."""

    def __init__(self, workdir: Path, coordinator: str, delays: Delays, seed: int) -> None:
        self.workdir, self.coordinator, self.delays = workdir, coordinator, delays
        self.rng = random.Random(seed)
        self.agents: list[SimAgent] = []
        self.heartbeats: list[float] = []  # every heartbeat's round trip, in order

    async def add(self, disks: int, heartbeat_jitter: float = 3.0) -> SimAgent:
        agent_id = f"sim{len(self.agents):04d}"
        for attempt in range(5):  # a free port may be taken before we bind it
            agent = SimAgent(agent_id, f"127.0.0.1:{free_port()}", self.workdir, disks,
                             self.coordinator, self.delays, self.rng, self.heartbeats)
            try:
                await agent.start_serving(self.rng.uniform(0, heartbeat_jitter))
            except OSError:
                await agent.close()
                if attempt == 4:
                    raise
                continue
            self.agents.append(agent)
            return agent
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await asyncio.gather(*(a.close() for a in self.agents), return_exceptions=True)


# ------------------------------------------------------------ what is measured


class LoopLag:
    """The longest this process' event loop was late (a simulator too busy to answer
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
    final_write: int      # the transactions' final write: record + backup set (+ keys)
    bound: int            # the coordinator's up-front bound of that write
    db_size: int
    revision: int


def proc_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds: user + system, peak resident bytes: VmHWM) of process *pid*."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])
    hwm = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text()
               .splitlines() if line.startswith("VmHWM:"))
    return ticks / os.sysconf("SC_CLK_TCK"), hwm * 1024


async def etcd_sizes(store: Store, txn_ids: Sequence[str]) -> EtcdSizes:
    start = b"/blocktxn/"
    kvs = await store._range("bench", start, prefix_range_end(start))
    values = {bytes(kv.key).decode(): bytes(kv.value) for kv in kvs}
    key, value = max(values.items(), key=lambda kv: len(kv[1]))
    final = bound = 0
    for txn_id in txn_ids:
        keys = [f"{PREFIX}txn/{txn_id}", f"{PREFIX}set/{txn_id}"]
        final = max(final, sum(len(k) + len(values.get(k, b"")) for k in keys))
        record = values.get(keys[0])
        if record is not None:
            bound = max(bound, final_write_bound(decode(record, keys[0], TxnRecord)))
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
    coordinator_cpu: float
    coordinator_rss: int
    sim_cpu: float
    sim_lag: float                # the simulator's worst event-loop delay
    heartbeat: float | None       # the slowest heartbeat round trip meanwhile (if any)
    refused: int                  # starts refused because an agent was lost
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
            ("coordinator CPU", self.coordinator_cpu, "s"),
            ("coordinator peak RSS", self.coordinator_rss / 1e6, "MB"),
            ("simulator CPU", self.sim_cpu, "s"),
            ("simulator loop lag (max)", self.sim_lag * 1000, "ms"),
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
    idle_cpu: float | None = None               # coordinator CPU s per s, heartbeats only
    idle_revisions: float | None = None         # etcd revisions per s, heartbeats only
    idle_heartbeat: float | None = None         # slowest heartbeat round trip then (ms)
    idle_sim_cpu: float | None = None           # this process' CPU s per s then
    idle_sim_lag: float | None = None           # this process' worst loop delay then (ms)
    not_live: int = 0                           # most simulated agents seen not live
    warnings: int = 0                           # simulated agents' warnings meanwhile

    def rows(self, baseline: Case | None) -> list[Row]:
        base = {(m.kind, k): v for m in (baseline.measured if baseline else [])
                for k, v, _ in m.metrics()}
        out = [Row(SECTION, self.name, metric, value, unit) for metric, value, unit in (
            ("registration", self.register_s, "s"),
            ("idle: coordinator CPU", self.idle_cpu, "s/s"),
            ("idle: etcd revisions", self.idle_revisions, "1/s"),
            ("idle: heartbeat round trip (max)", self.idle_heartbeat, "ms"),
            ("idle: simulator CPU", self.idle_sim_cpu, "s/s"),
            ("idle: simulator loop lag (max)", self.idle_sim_lag, "ms"),
            ("agents not live", self.not_live, "agents"),
            ("agent warnings", self.warnings, "lines")) if value is not None]
        for m in self.measured:
            for metric, value, unit in m.metrics():
                was = base.get((m.kind, metric))
                ratio = value / was if was and value and metric in RATIO else None
                out.append(Row(SECTION, self.name, f"{m.kind}: {metric}", float(value), unit,
                               baseline.name if ratio is not None and baseline else "",
                               ratio))
        return out


@dataclass
class Result:
    cases: list[Case]
    notes: list[str]

    @property
    def rows(self) -> list[Row]:
        base = self.cases[0]
        return [*base.rows(None), *(r for c in self.cases[1:] for r in c.rows(base))]


class Bench:
    """A real etcd and a real coordinator process, a client of it, and the simulation."""

    def __init__(self, workdir: Path, delays: Delays, seed: int) -> None:
        self.workdir = workdir
        self.etcd = EtcdServer(workdir / "etcd")
        self.coordinator = CoordinatorProcess("c0", workdir / "c0", self.etcd.endpoint)
        self.sim = Simulation(workdir / "agents", self.coordinator.address, delays, seed)
        self.notes: list[str] = []
        self.warnings = _Count()
        self._channel: grpc.aio.Channel | None = None
        self._store: Store | None = None
        self._seq = 0
        self.lag = LoopLag()
        self.last_live = 0  # simulated agents live in the last listing (of any case)

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
        logging.getLogger("blocktxn.agent").addHandler(self.warnings)
        self.etcd.start()
        self.coordinator.start()
        self._channel = grpc.aio.insecure_channel(self.coordinator.address)
        self._store = Store(self.etcd.endpoint)
        self.lag.start()
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
        logging.getLogger("blocktxn.agent").removeHandler(self.warnings)
        try:
            await self.lag.stop()
            await self.sim.close()
            if self._store is not None:
                await self._store.close()
            if self._channel is not None:
                await self._channel.close(None)
        finally:
            # read before the stop: a replica stopped says it no longer leads
            self.notes += coordinator_log_notes(self.workdir / "c0" / "c0.log")
            self.coordinator.stop()
            self.etcd.stop()

    # ------------------------------------------------------------------ agents
    async def live(self, agents: Sequence[SimAgent]) -> int:
        """How many of *agents* the coordinator lists as live with their inventory."""
        ids = {a.config.agent_id for a in agents}
        reply = await self.stub.ListAgents(cpb.ListAgentsRequest(), timeout=START_TIMEOUT)
        self.last_live = sum(1 for a in reply.agents
                             if a.agent_id in ids and a.live and a.inventory.vms)
        return self.last_live

    async def wait_registered(self, agents: Sequence[SimAgent]) -> float:
        """Wait until every agent had a heartbeat accepted since now, then until the
        coordinator lists them all live (a listing is not cheap: it reads every entry)."""
        t0 = time.monotonic()
        while True:
            waiting = sum(1 for a in agents if a.replicas.registered_at <= t0)
            if not waiting and await self.live(agents) == len(agents):
                return time.monotonic() - t0
            if time.monotonic() - t0 > REGISTER_TIMEOUT:
                raise SimulationError(
                    f"after {REGISTER_TIMEOUT:.0f}s, {waiting} of {len(agents)} simulated "
                    f"agents had no heartbeat accepted, {len(agents) - self.last_live} "
                    "were not live in the coordinator's listing")
            await asyncio.sleep(0.2 if waiting else 2.0)

    async def idle(self, case: Case, seconds: float) -> None:
        """While the agents only heartbeat: coordinator CPU (s/s), etcd revisions (1/s),
        the slowest heartbeat round trip, and this process' CPU and loop delay."""
        cpu0, _ = proc_usage(self.pid)
        rev0 = (await self.store.status()).revision
        beats, sim0 = len(self.sim.heartbeats), time.process_time()
        self.lag.take()
        await asyncio.sleep(seconds)
        cpu1, _ = proc_usage(self.pid)
        case.idle_sim_cpu = (time.process_time() - sim0) / seconds
        case.idle_sim_lag = self.lag.take() * 1000
        case.idle_cpu = (cpu1 - cpu0) / seconds
        case.idle_revisions = ((await self.store.status()).revision - rev0) / seconds
        slowest = max(self.sim.heartbeats[beats:], default=None)
        case.idle_heartbeat = None if slowest is None else slowest * 1000

    # ------------------------------------------------------------ transactions
    async def start(self, targets: list[str], mode: apb.BackupMode.ValueType
                    ) -> cpb.Transaction | grpc.aio.AioRpcError:
        """Start one transaction; the coordinator's refusal when an agent is lost or the
        transaction could never be decided (too large for one etcd request); nothing
        was started then."""
        self._seq += 1
        req = cpb.StartTransactionRequest(
            request_id=f"bench-sim-{self._seq}-{random.getrandbits(32):08x}",
            targets=[cpb.Target(target=t) for t in targets], mode=mode, deadline_s=DEADLINE_S)
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # a fresh coordinator may not lead yet
            try:
                txn: cpb.Transaction = await self.stub.StartTransaction(req,
                                                                         timeout=START_TIMEOUT)
                return txn
            except grpc.aio.AioRpcError as err:
                if _too_large(err) or _lost(err):
                    return err
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def watch(self, txn_id: str) -> cpb.Transaction:
        """Follow the transaction until DONE (as ``blocktxn backup --wait`` does)."""
        last: cpb.Transaction | None = None
        async for t in self.stub.WatchTransaction(cpb.GetTransactionRequest(txn_id=txn_id),
                                                  timeout=WATCH_TIMEOUT):
            last = t
        if last is None or last.phase != cpb.TXN_PHASE_DONE:
            raise SimulationError(f"{txn_id}: the watch ended before DONE")
        return last

    async def start_all(self, agents: Sequence[SimAgent], kind: str,
                        mode: apb.BackupMode.ValueType) -> tuple[list[cpb.Transaction], int]:
        """Start one grouped transaction of every disk of *agents*, or, if one could
        never be decided, the fewest equal parts that can (all at once). A start
        refused because an agent is lost waits until every agent is live again and
        retries (at most RETRIES times). Returns the transactions and those refusals."""
        targets = [t for a in agents for t in a.targets]
        parts = refused = 0
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
                                      f"({len(chunks[0])} agents each)")
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
                    raise SimulationError(f"{kind}: refused even per target: {err.details()}")
            else:
                refused += 1
                self.notes.append(f"{kind}: start refused: {err.details()}")
                if refused > RETRIES:
                    raise SimulationError(f"{kind}: refused {refused} times: {err.details()}")
                await self.wait_registered(agents)

    async def backup(self, agents: Sequence[SimAgent], kind: str,
                     mode: apb.BackupMode.ValueType) -> Measured:
        """Back up every disk of *agents* (see start_all); measure it."""
        cpu0, _ = proc_usage(self.pid)
        sim0, beats = time.process_time(), len(self.sim.heartbeats)
        self.lag.take()
        t0 = time.perf_counter()
        started, refused = await self.start_all(agents, kind, mode)
        done = await asyncio.gather(*(self.watch(t.txn_id) for t in started))
        wall = time.perf_counter() - t0
        cpu1, rss = proc_usage(self.pid)
        sim_cpu, lag = time.process_time() - sim0, self.lag.take()
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
        return Measured(kind, wall, list(done), committed, cpu1 - cpu0, rss, sim_cpu, lag,
                        max(self.sim.heartbeats[beats:], default=None), refused, sizes)

    async def run_case(self, name: str, agents: Sequence[SimAgent], incrementals: int,
                       disks: int) -> Case:
        """Registration, idle heartbeats, then a full backup and *incrementals*
        incrementals of every disk of *agents*; what failed ends the case, in the notes."""
        case = Case(name, len(agents), disks)
        warned = self.warnings.count
        kinds = [("full", apb.BACKUP_MODE_FULL)] + [
            (f"incr{i + 1}", apb.BACKUP_MODE_INCREMENTAL) for i in range(incrementals)]
        try:
            case.register_s = await self.wait_registered(agents)
            await self.idle(case, IDLE_S)
            log.info("%s: %d agents registered in %.1fs; idle coordinator CPU %.2f s/s",
                     name, len(agents), case.register_s, case.idle_cpu)
            for kind, mode in kinds:
                m = await self.backup(agents, kind, mode)
                case.measured.append(m)
                case.not_live = max(case.not_live, len(agents) - await self.live(agents))
                log.info("%s: %s: %.0f ms, %d disks committed, coordinator CPU %.2f s",
                         name, kind, m.wall * 1000, m.committed_disks, m.coordinator_cpu)
        except SimulationError as err:
            self.notes.append(f"{name}: FAILED: {err}")
            case.not_live = max(case.not_live, len(agents) - self.last_live)
        case.warnings = self.warnings.count - warned
        if case.warnings:
            self.notes.append(f"{name}: {case.warnings} warnings of simulated agents, first: "
                              + " | ".join(sorted(set(self.warnings.first))))
        if case.measured:
            largest = max(case.measured, key=lambda m: m.sizes.largest).sizes
            self.notes.append(f"{name}: largest etcd value {largest.largest:,} bytes at "
                              f"{largest.largest_key}")
        return case


def _too_large(err: grpc.aio.AioRpcError) -> bool:
    return err.code() == grpc.StatusCode.INVALID_ARGUMENT and \
        "split the targets" in (err.details() or "")


def _lost(err: grpc.aio.AioRpcError) -> bool:
    return err.code() == grpc.StatusCode.FAILED_PRECONDITION and \
        "lost (no heartbeat)" in (err.details() or "")


def coordinator_log_notes(path: Path) -> list[str]:
    """The coordinator's warnings and errors: how many, and the first few."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    bad = [ln for ln in lines if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]
    if not bad:
        return ["coordinator log: no warning or error"]
    seen: list[str] = []
    for ln in bad:
        text = ln.split(" ", 3)[-1][:160]
        if text not in seen:
            seen.append(text)
    return [f"coordinator log: {len(bad)} warning/error lines; first: " + " | ".join(seen[:5])]


# --------------------------------------------------------------------- the run


async def scale(agents: int, disks: int, incrementals: int, delays: Delays | None = None,
                seed: int = 1, keep: Path | None = None) -> Result:
    """The 1-agent baseline, then *agents* simulated agents of *disks* disks each: a
    full backup of every disk, then *incrementals* zero-change incrementals."""
    workdir = Path(tempfile.mkdtemp(prefix="blocktxn-sim-", dir="/tmp"))
    try:
        async with Bench(workdir, delays or Delays(), seed) as bench:
            first = await bench.sim.add(disks, heartbeat_jitter=0.0)
            baseline = await bench.run_case(f"sim-1x{disks}", [first], incrementals, disks)
            for _ in range(agents - 1):
                await bench.sim.add(disks)
            big = await bench.run_case(f"sim-{agents}x{disks}", bench.sim.agents,
                                       incrementals, disks)
        return Result([baseline, big], bench.notes)
    finally:
        if keep is not None:
            shutil.copytree(workdir / "c0", keep, dirs_exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


def run_scale(quick: bool) -> list[Row]:
    """The SIMULATED scale benchmark: 100 agents x 10 disks, 3 incrementals (quick:
    10 x 3, 1 incremental), and the 1-agent baseline of the same run."""
    agents, disks, incrementals = (10, 3, 1) if quick else (100, 10, 3)
    return asyncio.run(scale(agents, disks, incrementals)).rows


# ------------------------------------------------------------ the real agent's times


def measure_real_agent(disk_counts: tuple[int, int] = (1, 8), reps: int = 7
                       ) -> dict[str, tuple[float, float]]:
    """Time the real agent's calls (lab VMs on qemu-storage-daemon, quiesce none,
    zero-change incrementals): medians for each disk count, and the line through them
    as (base, per disk) seconds: what MEASURED holds."""
    medians: dict[int, dict[str, float]] = {}
    for n in disk_counts:
        with tempfile.TemporaryDirectory(prefix="blocktxn-sim-measure-", dir="/tmp") as tmp:
            host = Host(Path(tmp) / "h", {VM: [f"d{i}" for i in range(n)]})
            try:
                host.start_agent()
                medians[n] = _time_real_agent(host, [(VM, f"d{i}") for i in range(n)], reps)
            finally:
                host.close()
        print(f"{n} disks: " + ", ".join(f"{k} {v * 1000:.1f} ms"
                                          for k, v in medians[n].items()), file=sys.stderr)
    lo, hi = disk_counts
    out = {}
    for step in MEASURED:
        per_disk = max(0.0, (medians[hi][step] - medians[lo][step]) / (hi - lo))
        out[step] = (max(0.0, medians[lo][step] - per_disk * lo), per_disk)
    return out


def _time_real_agent(host: Host, members: list[tuple[str, str]], reps: int
                     ) -> dict[str, float]:
    none, incremental = apb.QUIESCE_NONE, apb.BACKUP_MODE_INCREMENTAL
    host.backup("sim-measure-full", members, quiesce=none, mode=apb.BACKUP_MODE_FULL)
    times: dict[str, list[float]] = {step: [] for step in MEASURED}

    def lap(step: str, t0: float) -> float:
        now = time.perf_counter()
        times[step].append(now - t0)
        return now

    for r in range(reps):
        t = time.perf_counter()
        host.inventory()
        t = lap("inventory", t)
        host.cut(f"sim-measure-{r}", members, mode=incremental, quiesce=none)
        t = lap("cut", t)
        host.thaw(f"sim-measure-{r}")
        t = lap("thaw", t)
        if not host.prepare(f"sim-measure-{r}").yes:
            raise SimulationError("the real agent voted NO")
        t = lap("prepare", t)
        host.commit(f"sim-measure-{r}")
        lap("commit", t)
        host.cut(f"sim-measure-abort-{r}", members, mode=incremental, quiesce=none)
        host.thaw(f"sim-measure-abort-{r}")
        host.prepare(f"sim-measure-abort-{r}")
        t = time.perf_counter()
        host.abort(f"sim-measure-abort-{r}")
        lap("abort", t)
    return {step: statistics.median(v) for step, v in times.items()}


# ------------------------------------------------------------------------ the CLI


def table(result: Result) -> str:
    base, *rest = result.cases
    big = rest[-1]
    rows = {r.metric: r for r in big.rows(base)}
    base_rows = {r.metric: r for r in base.rows(None)}
    width = max(len(m) for m in rows) + 2
    out = [f"SIMULATION: {big.agents} simulated agents x {big.disks} disks "
           f"({big.agents * big.disks:,} disks) in one process, against a real etcd and a "
           "real coordinator process",
           f"{'metric':<{width}}{'unit':>7}{base.name:>14}{big.name:>14}{'ratio':>9}"]
    for metric, r in rows.items():
        b = base_rows.get(metric)
        out.append(f"{metric:<{width}}{r.unit:>7}{_num(b.value if b else math.nan):>14}"
                   f"{_num(r.value):>14}{f'{r.ratio:.2f}x' if r.ratio is not None else '':>9}")
    out += ["", f"targets ({big.name}):"]

    def worst(suffix: str) -> float:
        return max((r.value for m, r in rows.items() if m.endswith(suffix)), default=math.nan)

    for what, got, target, unit in (
            ("decision after the last vote", worst("decision after last vote") / 1000,
             DECISION_TARGET, "s"),
            ("coordinator peak RSS", worst("coordinator peak RSS"), RSS_TARGET / 1e6, "MB"),
            ("largest etcd value", worst("largest etcd value") / 2**20,
             ETCD_MAX_REQUEST / 2**20, "MiB"),
            ("largest etcd request (final write)", worst("final write (record + set)") / 2**20,
             ETCD_MAX_REQUEST / 2**20, "MiB")):
        verdict = "not measured" if math.isnan(got) else "met" if got <= target else "NOT met"
        out.append(f"  {what}: {got:.3f} {unit} (target <= {target:g} {unit}): {verdict}")
    out += ["", "notes:", *(f"  {n}" for n in result.notes)]
    return "\n".join(out)


def _num(v: float) -> str:
    if math.isnan(v):
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sim", description=(
        "SIMULATED agents against a real coordinator and etcd: the scale benchmark"))
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--disks", type=int, default=10, help="disks per simulated agent")
    p.add_argument("--incrementals", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="10 agents x 3 disks, 1 incremental")
    p.add_argument("--jitter", type=float, default=0.2, help="+- share of each step's time")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep-log", type=Path, help="copy the coordinator's directory here")
    p.add_argument("--measure", action="store_true",
                   help="time the real agent's calls instead (needs QEMU): MEASURED")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s "
                        "%(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("blocktxn.agent").propagate = False  # counted, not printed
    if args.measure:
        for step, (base, per_disk) in measure_real_agent().items():
            print(f'    "{step}": ({base:.4f}, {per_disk:.4f}),')
        return
    if args.quick:
        args.agents, args.disks, args.incrementals = 10, 3, 1
    if args.agents < 1 or args.disks < 1 or args.incrementals < 0:
        p.error("--agents and --disks must be >= 1, --incrementals >= 0")

    async def run() -> Result:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await scale(args.agents, args.disks, args.incrementals,
                           Delays(jitter=args.jitter), args.seed, args.keep_log)

    print(table(asyncio.run(run())))


if __name__ == "__main__":
    main()
