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
  all of them in this one asyncio loop (a real agent heartbeats from a thread of its
  own; a thousand threads with a loop each would simulate the machine, not the agents).
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
from typing import Any

import grpc

from bench.fleet import Bench, FleetError, Member
from bench.measures import Result, table
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
from blocktxn.demo.lab import free_port
from blocktxn.requests import DiskRequest, check_cut
from blocktxn.tls import TlsFiles
from blocktxn.v1 import agent_pb2 as apb
from tests.integration.harness import Host

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
IDLE_S = 5.0                 # seconds of heartbeats only, measured before the backups

log = logging.getLogger(__name__)


SimulationError = FleetError


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
    def agent_id(self) -> str:
        return self.config.agent_id

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
        # on this loop, through the timed link (a thread each: 1,000 threads and loops)
        await register_forever(self, self.config, self.replicas, own_thread=False)

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
        text = record.getMessage()[:160]
        if len(self.first) < 5 and text not in self.first:
            self.first.append(text)


class Simulation:
    """The simulated agents of one run, in this process (a ``bench.fleet.Side``)."""

    def __init__(self, workdir: Path, coordinator: str, delays: Delays, seed: int) -> None:
        self.workdir, self.coordinator, self.delays = workdir, coordinator, delays
        self.rng = random.Random(seed)
        self.agents: list[SimAgent] = []
        self.heartbeats: list[float] = []  # every heartbeat's round trip, in order
        self.made = 0
        self.counted = _Count()
        logging.getLogger("blocktxn.agent").addHandler(self.counted)

    async def add(self, disks: int, first: bool) -> SimAgent:
        agent_id = f"sim{self.made:04d}"  # taken before any await: adds run at once
        self.made += 1
        jitter = 0.0 if first else self.rng.uniform(0, 3.0)
        for attempt in range(5):  # a free port may be taken before we bind it
            agent = SimAgent(agent_id, f"127.0.0.1:{free_port()}", self.workdir, disks,
                             self.coordinator, self.delays, self.rng, self.heartbeats)
            try:
                await agent.start_serving(jitter)
            except OSError:
                await agent.close()
                if attempt == 4:
                    raise
                continue
            self.agents.append(agent)
            return agent
        raise AssertionError("unreachable")

    def waiting(self, members: Sequence[Member], since: float) -> int:
        return 0  # heartbeats go to the heartbeat server: the coordinator's listing tells

    def usage(self) -> dict[str, tuple[float, int]]:
        return {"simulator": (time.process_time(), 0)}

    def warnings(self) -> tuple[int, list[str]]:
        return self.counted.count, list(self.counted.first)

    async def close(self) -> None:
        logging.getLogger("blocktxn.agent").removeHandler(self.counted)
        await asyncio.gather(*(a.close() for a in self.agents), return_exceptions=True)


# --------------------------------------------------------------------- the run


async def scale(agents: int, disks: int, incrementals: int, delays: Delays | None = None,
                seed: int = 1, keep: Path | None = None) -> Result:
    """The 1-agent baseline, then *agents* simulated agents of *disks* disks each: a
    full backup of every disk, then *incrementals* zero-change incrementals."""
    workdir = Path(tempfile.mkdtemp(prefix="blocktxn-sim-", dir="/tmp"))

    def side(coordinator: str) -> Simulation:
        return Simulation(workdir / "agents", coordinator, delays or Delays(), seed)

    try:
        async with Bench(workdir, side, IDLE_S, "bench-sim") as bench:
            first = await bench.add(disks, 1, first=True)
            baseline = await bench.run_case(f"sim-1x{disks}", first, incrementals, disks)
            await bench.add(disks, agents - 1)
            big = await bench.run_case(f"sim-{agents}x{disks}", bench.members,
                                       incrementals, disks)
        return bench.result(SECTION, [baseline, big])
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

    result = asyncio.run(run())
    big = result.cases[-1]
    print(table(result, f"SIMULATION: {big.agents} simulated agents x {big.disks} disks "
                        f"({big.agents * big.disks:,} disks) in one process, against a real "
                        "etcd and a real coordinator process"))


if __name__ == "__main__":
    main()
