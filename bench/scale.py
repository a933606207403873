"""The scale run of REAL processes (issue #16): one etcd, one coordinator process and N
real ``blocktxn agent`` processes on this machine, each serving one
qemu-storage-daemon VM of D small qcow2 disks.

    .venv/bin/python -m bench.scale --hosts 100 --disks-per-host 10 [--incrementals 3]
        [--idle 60] [--out DIR]
    .venv/bin/python -m bench.scale --quick      # 10 hosts x 3 disks, 1 incremental

First the one-VM baseline (host s000 alone): registration, an idle stretch, a grouped
full backup of its disks and zero-change incrementals. Then hosts s001... start and
the same runs over every disk of every host, as ONE grouped transaction each (several
at once only where one could not be decided). Prints, and writes as ``scale.csv`` and
``scale.png`` into ``--out``: wall per transaction and its ratio to the baseline,
CPU-seconds per role (coordinator, agents with their children, QEMU, etcd) and
resident memory, etcd revisions per transaction and per idle minute, etcd's growth,
the largest etcd value and the largest request (a transaction's final write), the
decision's latency after the last vote, the agents live in etcd every second, and
every WARNING/ERROR line of the coordinator and the agents (``warnings.log``).

The machine is shared: read the ratios to the baseline of the same run, not the
absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.fleet import Bench, Member
from bench.measures import Case, Result, bad_lines, distinct, log_notes, proc_table, table
from bench.report import Row, write_csv
from blocktxn import procs
from blocktxn.demo.lab import AgentProcess, LabVm

if TYPE_CHECKING:
    from matplotlib.axes import Axes

SECTION = "scale (real processes)"
VM = "vm"
DISK_SIZE = 1 << 20


@dataclass
class RealHost:
    """One simulated host made of real processes: a VM and the agent that serves it."""

    agent_id: str
    vm: LabVm
    agent: AgentProcess
    disks: int

    @property
    def targets(self) -> list[str]:
        return [f"{self.agent_id}/{VM}"]

    def stop(self) -> None:
        self.agent.stop()
        self.vm.stop()


def _tick() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def _stat(pid: int) -> tuple[int, float, float]:
    """(parent pid, own CPU s, CPU s of waited-for children) of process *pid*."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    f = stat[stat.rindex(")") + 2:].split()
    return int(f[1]), (int(f[11]) + int(f[12])) / _tick(), (int(f[13]) + int(f[14])) / _tick()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_usage(roots: Sequence[int]) -> tuple[float, int]:
    """CPU seconds (own, children waited for, and live descendants) and resident bytes
    (own and live descendants) of the processes *roots*, summed."""
    stats, children = proc_table(_stat)
    cpu, rss = 0.0, 0
    todo = [p for p in roots if p in stats]
    seen = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        _, own, waited = stats[pid]
        cpu += own + waited
        try:
            rss += _rss(pid)
        except OSError:
            pass
        todo += children.get(pid, [])
    return cpu, rss


class RealFleet:
    """The agents' side of a real run (a ``bench.fleet.Side``)."""

    def __init__(self, workdir: Path, coordinator: str) -> None:
        self.workdir, self.coordinator = workdir, coordinator
        self.hosts: list[RealHost] = []
        self.heartbeats: list[float] = []  # real agents' heartbeats are not timed here
        self.made = 0

    async def add(self, disks: int, first: bool) -> Member:
        agent_id = f"s{self.made:03d}"  # taken before any await: adds run at once
        self.made += 1
        host = await asyncio.to_thread(self._start, agent_id, disks)
        self.hosts.append(host)
        return host

    def _start(self, agent_id: str, disks: int) -> RealHost:
        root = self.workdir / agent_id
        vm = LabVm.create(VM, root / VM, [f"d{i}" for i in range(disks)], size=DISK_SIZE)
        # started on one of the event loop's executor threads, which last until the run
        # ends: killed with the bench, never before
        vm.prefix = procs.DIE_WITH_PARENT
        vm.start()
        agent = AgentProcess(agent_id, root / "agent", [vm], {},
                             extra=["--coordinator", self.coordinator],
                             prefix=procs.DIE_WITH_PARENT)
        try:
            agent.start()
        except BaseException:
            vm.stop()
            raise
        return RealHost(agent_id, vm, agent, disks)

    def waiting(self, members: Sequence[Member], since: float) -> int:
        return 0  # the coordinator's listing tells

    def usage(self) -> dict[str, tuple[float, int]]:
        agents = [h.agent.proc.pid for h in self.hosts if h.agent.proc is not None]
        qemu = [h.vm.proc.pid for h in self.hosts if h.vm.proc is not None]
        return {"agents": tree_usage(agents), "QEMU": tree_usage(qemu)}

    def logs(self) -> list[Path]:
        return [h.agent.workdir / "agent.log" for h in self.hosts]

    def warnings(self) -> tuple[int, list[str]]:
        bad = bad_lines(self.logs())
        return len(bad), distinct(bad)

    async def close(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(h.stop) for h in self.hosts),
                             return_exceptions=True)


@dataclass
class ScaleRun:
    result: Result
    warnings: list[str]      # every WARNING/ERROR/traceback line, coordinator's first


async def scale(hosts: int, disks: int, incrementals: int, idle_s: float,
                workdir: Path | None = None) -> ScaleRun:
    """The one-host baseline, then *hosts* hosts (see the module docstring)."""
    own = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="blocktxn-scale-", dir="/tmp"))
    fleets: list[RealFleet] = []

    def side(coordinator: str) -> RealFleet:
        fleets.append(RealFleet(work / "hosts", coordinator))
        return fleets[0]

    try:
        async with Bench(work, side, idle_s, "bench-scale") as bench:
            first = await bench.add(disks, 1, first=True)
            baseline = await bench.run_case(f"1x{disks}", first, incrementals, disks)
            await bench.add(disks, hosts - 1)
            cases = [baseline]
            if hosts > 1:
                cases.append(await bench.run_case(f"{hosts}x{disks}", bench.members,
                                                  incrementals, disks))
        fleet = fleets[0]
        bench.notes += log_notes("agents", fleet.logs())
        warnings = bad_lines([work / "c0" / "c0.log", *fleet.logs()])
        return ScaleRun(bench.result(SECTION, cases), warnings)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def run_scale(quick: bool) -> list[Row]:
    """For ``python -m bench``: 100 hosts x 10 disks, 3 incrementals (quick: 10 x 3, 1)."""
    hosts, disks, incrementals = (10, 3, 1) if quick else (100, 10, 3)
    return asyncio.run(scale(hosts, disks, incrementals, 10.0 if quick else 60.0)).result.rows


# --------------------------------------------------------------------- the plot


def plot(result: Result, path: Path) -> None:
    """scale.png: wall per transaction against the baseline, CPU per role, live agents
    over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    _wall_panel(axes[0], result.cases)
    _cpu_panel(axes[1], result.cases[-1])
    _live_panel(axes[2], result)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _wall_panel(ax: Axes, cases: list[Case]) -> None:
    ax.set_title("wall per transaction (ratio: to the 1-host baseline)")
    kinds = [m.kind for m in cases[0].measured]
    width = 0.8 / max(1, len(cases))
    for i, case in enumerate(cases):
        walls = {m.kind: m.wall for m in case.measured}
        xs = [k + i * width for k in range(len(kinds))]
        bars = ax.bar(xs, [walls.get(k, 0.0) for k in kinds], width,
                      label=f"{case.name} ({case.agents * case.disks} disks)")
        if i:
            base = {m.kind: m.wall for m in cases[0].measured}
            for bar, k in zip(bars, kinds, strict=True):
                if base.get(k) and walls.get(k):
                    ax.annotate(f"{walls[k] / base[k]:.0f}x", (bar.get_x(), bar.get_height()),
                                fontsize=8, va="bottom")
    ax.set_xticks([k + width * (len(cases) - 1) / 2 for k in range(len(kinds))], kinds)
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)


def _cpu_panel(ax: Axes, case: Case) -> None:
    ax.set_title(f"CPU-seconds per transaction by role ({case.name})")
    kinds = [m.kind for m in case.measured]
    bottom = [0.0] * len(kinds)
    roles = list(dict.fromkeys(r for m in case.measured for r in m.cpu))
    for role in roles:
        values = [m.cpu.get(role, 0.0) for m in case.measured]
        ax.bar(kinds, values, bottom=bottom, label=role)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("CPU seconds")
    ax.legend(fontsize=8)


def _live_panel(ax: Axes, result: Result) -> None:
    ax.set_title("agents live in etcd (sampled every second)")
    if result.live:
        ax.plot([t for t, _ in result.live], [n for _, n in result.live])
    ax.axhline(result.cases[-1].agents, linestyle=":", color="grey", label="agents started")
    ax.set_xlabel("seconds since the start")
    ax.set_ylabel("agents")
    ax.legend(fontsize=8)


# ---------------------------------------------------------------------- the CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=(
        "REAL agent processes, each with a qemu-storage-daemon VM, against a real "
        "coordinator and etcd"))
    p.add_argument("--hosts", type=int, default=100, help="agents (1-500)")
    p.add_argument("--disks-per-host", type=int, default=10, help="1 MiB disks per VM (1-64)")
    p.add_argument("--incrementals", type=int, default=3, help="zero-change incrementals "
                   "after the full (0-20)")
    p.add_argument("--idle", type=float, default=60.0,
                   help="seconds of heartbeats only before the backups (5-600)")
    p.add_argument("--quick", action="store_true", help="10 hosts x 3 disks, 1 incremental")
    p.add_argument("--out", type=Path, help="where scale.csv, scale.png and warnings.log go "
                   "(default: a new directory under /tmp)")
    p.add_argument("--workdir", type=Path, help="keep the run's files here")
    a = p.parse_args(argv)
    if a.quick:
        a.hosts, a.disks_per_host, a.incrementals, a.idle = 10, 3, 1, 10.0
    if not (1 <= a.hosts <= 500 and 1 <= a.disks_per_host <= 64 and 0 <= a.incrementals
            <= 20 and 5 <= a.idle <= 600):
        p.error("--hosts 1-500, --disks-per-host 1-64, --incrementals 0-20, --idle 5-600")
    for tool in ("etcd", "qemu-storage-daemon", "qemu-img"):
        if shutil.which(tool) is None:
            print(f"python -m bench.scale: {tool} is not installed (bash deploy/setup.sh "
                  "install)", file=sys.stderr)
            return 2
    out: Path = a.out or Path(tempfile.mkdtemp(prefix="blocktxn-scale-out-"))
    out.mkdir(parents=True, exist_ok=True)

    async def run() -> ScaleRun:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await scale(a.hosts, a.disks_per_host, a.incrementals, a.idle, a.workdir)

    got = asyncio.run(run())
    write_csv(got.result.rows, out / "scale.csv")
    plot(got.result, out / "scale.png")
    (out / "warnings.log").write_text("".join(f"{ln}\n" for ln in got.warnings))
    big = got.result.cases[-1]
    print(table(got.result, f"REAL PROCESSES: {big.agents} agents x {big.disks} disks "
                            f"({big.agents * big.disks:,} disks), each agent with its own "
                            "qemu-storage-daemon VM, one coordinator, one etcd"))
    print(f"\n{len(got.warnings)} warning/error lines (all in {out / 'warnings.log'}); "
          f"wrote {out / 'scale.csv'} and {out / 'scale.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
