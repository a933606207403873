"""An agent's CPU cost per disk of a zero-change incremental (issue #16, item 4).

    .venv/bin/python -m bench.agent_cost [--disks 100] [--incrementals 5]
        [--via coordinator|agent] [--settle 2] [--py-spy PATH --spy-out FILE]

One real ``blocktxn agent`` process serving one qemu-storage-daemon VM of ``--disks``
small (1 MiB) qcow2 disks. A full backup of every disk, then ``--incrementals``
zero-change incrementals of all of them, one grouped transaction each: through a real
coordinator (one etcd, one coordinator; the agent heartbeats to it, as in production,
so the inventory it takes after a transaction counts), or ``--via agent``: Cut, Thaw,
Prepare, Commit over the agent's gRPC alone. Quiesce none.

For each incremental: CPU seconds (utime + stime, /proc/PID/stat) of the agent with its
children (waited for, and live ones) and of QEMU, from just before the transaction
until ``--settle`` seconds after it is done (the background work it causes: checksums,
the inventory, counts). The same stretch with no transaction (idle: heartbeats) is
measured first and reported apart. Prints ms CPU per disk per incremental (mean over
the incrementals) for the agent and QEMU, the agent's per thread (user + system;
"main" is the event loop's), and the CPU of the processes the agent ran meanwhile
(there should be none).

``--py-spy PATH``: record the agent with that py-spy binary during the incrementals
(a developer tool, never a dependency) into ``--spy-out`` (raw folded stacks; a
``.svg`` or ``.json`` name gives a flame graph or speedscope file).

The machine is shared: CPU seconds, not wall time, are what this reads; compare
before/after within runs on the same machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.measures import proc_table
from blocktxn import procs
from blocktxn.coordinator.etcd_server import EtcdServer
from blocktxn.demo.lab import AgentProcess, LabVm, free_port
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import agent_pb2_grpc as apb_grpc
from blocktxn.v1 import coordinator_pb2 as cpb
from blocktxn.v1 import coordinator_pb2_grpc as cpb_grpc

VM = "vm"
DISK_SIZE = 1 << 20
RPC_TIMEOUT = 120.0


def _tick() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def _stat(pid: int) -> tuple[int, float, float, float]:
    """(parent pid, own CPU s, CPU s of waited-for children, own system CPU s) of *pid*."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    f = stat[stat.rindex(")") + 2:].split()
    return (int(f[1]), (int(f[11]) + int(f[12])) / _tick(),
            (int(f[13]) + int(f[14])) / _tick(), int(f[12]) / _tick())


@dataclass(frozen=True)
class Usage:
    cpu: float          # CPU s of the process, its waited-for children and live descendants
    children: float     # CPU s of its waited-for children alone (processes it ran)
    descendants: int    # live descendants now
    system: float       # the process' own system CPU s (fsyncs, sockets, threads)


def threads(pid: int) -> dict[str, tuple[float, float]]:
    """(user, system) CPU s per thread name of process *pid* (threads of one name
    summed; the main thread, the event loop's, as "main")."""
    out: dict[str, tuple[float, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = "main" if tid == str(pid) else stat[stat.index("(") + 1:stat.rindex(")")]
        f = stat[stat.rindex(")") + 2:].split()
        user, system = out.get(name, (0.0, 0.0))
        out[name] = (user + int(f[11]) / _tick(), system + int(f[12]) / _tick())
    return out


def usage(root: int) -> Usage:
    stats, kids = proc_table(_stat)
    cpu, todo, seen = 0.0, [root], 0
    waited = stats[root][2] if root in stats else 0.0
    while todo:
        pid = todo.pop()
        if pid not in stats:
            continue
        _, own, waited, _ = stats[pid]
        cpu += own + waited
        seen += 1
        todo += kids.get(pid, [])
    return Usage(cpu, waited, seen - 1, stats[root][3] if root in stats else 0.0)


class Lab:
    """One VM of *disks* disks, one agent, and (``via == "coordinator"``) etcd and a
    coordinator it registers with."""

    def __init__(self, work: Path, disks: int, via: str) -> None:
        self.work, self.via = work, via
        self.disks = [f"d{i}" for i in range(disks)]
        self.vm = LabVm.create(VM, work / VM, self.disks, size=DISK_SIZE)
        self.vm.prefix = procs.DIE_WITH_PARENT  # nothing outlives a killed bench
        self.etcd: EtcdServer | None = None
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.cstub: cpb_grpc.CoordinatorServiceStub | None = None
        self.channels: list[grpc.Channel] = []
        extra: list[str] = []
        self.vm.start()
        if via == "coordinator":
            self.etcd = EtcdServer(work / "etcd")
            self.etcd.start()
            address = f"127.0.0.1:{free_port()}"
            (work / "c0").mkdir()
            self.coordinator = subprocess.Popen(
                [*procs.DIE_WITH_PARENT, sys.executable, "-m", "blocktxn.coordinator",
                 "--name", "c0", "--listen",
                 address, "--etcd", self.etcd.endpoint, "--data-dir", str(work / "c0")],
                stdout=subprocess.DEVNULL, stderr=open(work / "c0" / "c0.log", "ab"))
            extra = ["--coordinator", address]
            ch = grpc.insecure_channel(address)
            self.channels.append(ch)
            self.cstub = cpb_grpc.CoordinatorServiceStub(ch)
        self.agent = AgentProcess("a1", work / "agent", [self.vm], {}, extra,
                                  prefix=procs.DIE_WITH_PARENT)
        self.agent.start()
        ch = grpc.insecure_channel(self.agent.address)
        self.channels.append(ch)
        self.astub = apb_grpc.AgentServiceStub(ch)
        self.astub.GetInventory(apb.GetInventoryRequest(), timeout=60, wait_for_ready=True)
        if self.cstub is not None:
            self._wait_registered()
        self.count = 0

    @property
    def agent_pid(self) -> int:
        assert self.agent.proc is not None
        return self.agent.proc.pid

    def _wait_registered(self, timeout: float = 60) -> None:
        assert self.cstub is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                agents = self.cstub.ListAgents(cpb.ListAgentsRequest(), timeout=5).agents
                if any(a.live and a.inventory.vms for a in agents):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the agent did not register")

    def backup(self, mode: apb.BackupMode.ValueType) -> None:
        """One grouped transaction of every disk, committed."""
        self.count += 1
        if self.cstub is not None:
            self._through_coordinator(mode)
            return
        txn = f"cost-{self.count}"
        self.astub.Cut(apb.CutRequest(
            txn_id=txn, quiesce=apb.QUIESCE_NONE, freeze_timeout_s=30,
            members=[apb.CutMember(vm=VM, disk=d, mode=mode) for d in self.disks]),
            timeout=RPC_TIMEOUT)
        self.astub.Thaw(apb.ThawRequest(txn_id=txn), timeout=RPC_TIMEOUT)
        vote = self.astub.Prepare(apb.PrepareRequest(txn_id=txn, timeout_s=RPC_TIMEOUT),
                                  timeout=RPC_TIMEOUT)
        if not vote.yes:
            raise RuntimeError(f"{txn}: the agent voted NO: {vote.reason}")
        self.astub.Commit(apb.CommitRequest(txn_id=txn), timeout=RPC_TIMEOUT)

    def _through_coordinator(self, mode: apb.BackupMode.ValueType) -> None:
        assert self.cstub is not None
        req = cpb.StartTransactionRequest(
            request_id=f"cost-{os.getpid()}-{self.count}", targets=[cpb.Target(target=f"a1/{VM}")],
            mode=mode, quiesce=apb.QUIESCE_NONE)
        deadline = time.monotonic() + 60
        while True:  # a fresh coordinator may not lead yet
            try:
                txn = self.cstub.StartTransaction(req, timeout=RPC_TIMEOUT)
                break
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        done = txn
        for update in self.cstub.WatchTransaction(
                cpb.GetTransactionRequest(txn_id=txn.txn_id), timeout=RPC_TIMEOUT):
            done = update
        if done.phase != cpb.TXN_PHASE_DONE or done.decision != cpb.DECISION_COMMIT:
            raise RuntimeError(f"{txn.txn_id}: not committed: {done.reason or done.phase}")

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        self.agent.stop()
        procs.terminate(self.coordinator)
        if self.etcd is not None:
            self.etcd.stop()
        self.vm.stop()


@dataclass
class Sample:
    agent: float     # CPU s, with its children
    children: float  # CPU s of the processes the agent ran (and waited for)
    system: float    # the agent's own system CPU s
    qemu: float
    wall: float      # s of the transaction alone


def measure(lab: Lab, settle: float, mode: apb.BackupMode.ValueType | None) -> Sample:
    """What *lab*'s agent and QEMU spent on one transaction of *mode* (None: none, an
    idle stretch) and the *settle* seconds after it."""
    a0, q0 = usage(lab.agent_pid), usage(lab.vm.pid).cpu
    t0 = time.perf_counter()
    if mode is not None:
        lab.backup(mode)
    wall = time.perf_counter() - t0
    time.sleep(settle)
    a1 = usage(lab.agent_pid)
    return Sample(a1.cpu - a0.cpu, a1.children - a0.children, a1.system - a0.system,
                  usage(lab.vm.pid).cpu - q0, wall)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.agent_cost",
                                description=__doc__.split("\n")[0])
    p.add_argument("--disks", type=int, default=100)
    p.add_argument("--incrementals", type=int, default=5)
    p.add_argument("--via", choices=("coordinator", "agent"), default="coordinator")
    p.add_argument("--settle", type=float, default=2.0,
                   help="s measured after each transaction is done (default 2)")
    p.add_argument("--workdir", type=Path, help="default: a new directory under /tmp")
    p.add_argument("--py-spy", type=Path, help="record the agent with this py-spy binary")
    p.add_argument("--spy-out", type=Path, default=Path("agent-cost.txt"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    own = args.workdir is None
    work: Path = args.workdir or Path(tempfile.mkdtemp(prefix="blocktxn-agent-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    n = args.disks
    lab: Lab | None = None
    spy: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.monotonic()
        lab = Lab(work, n, args.via)
        print(f"agent_cost: {n} disks, via {args.via}: agent pid {lab.agent_pid}, "
              f"QEMU pid {lab.vm.pid} (ready in {time.monotonic() - t0:.1f} s)", flush=True)
        full = measure(lab, args.settle, apb.BACKUP_MODE_FULL)
        print(f"full backup: agent {full.agent * 1000 / n:.2f} ms CPU/disk, QEMU "
              f"{full.qemu * 1000 / n:.2f}, wall {full.wall:.2f} s", flush=True)
        lab.backup(apb.BACKUP_MODE_INCREMENTAL)  # warm-up (imports, first chain)
        time.sleep(args.settle)
        idle = measure(lab, args.settle, None)
        if args.py_spy:
            fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(args.spy_out.suffix, "raw")
            spy = subprocess.Popen([str(args.py_spy), "record", "-p", str(lab.agent_pid),
                                    "-o", str(args.spy_out), "-f", fmt, "-r", "250", "--gil",
                                    "--nonblocking"], stdout=subprocess.DEVNULL)
            time.sleep(1.0)
        samples: list[Sample] = []
        by_thread = threads(lab.agent_pid)
        before = usage(lab.agent_pid).descendants
        most = before
        for i in range(args.incrementals):
            s = measure(lab, args.settle, apb.BACKUP_MODE_INCREMENTAL)
            most = max(most, usage(lab.agent_pid).descendants)
            samples.append(s)
            print(f"incremental {i + 1}: agent {s.agent * 1000 / n:.2f} ms CPU/disk "
                  f"(system {s.system * 1000 / n:.2f}, children {s.children * 1000 / n:.2f}), "
                  f"QEMU {s.qemu * 1000 / n:.2f}, wall {s.wall * 1000:.0f} ms", flush=True)
        after = threads(lab.agent_pid)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            print(f"py-spy: {args.spy_out}")
        # the mean: a clock tick (10 ms) is a lot against a few disks' share
        agent = statistics.fmean(s.agent for s in samples) * 1000 / n
        qemu = statistics.fmean(s.qemu for s in samples) * 1000 / n
        idle_agent = idle.agent * 1000 / n
        print(f"\nzero-change incremental, {n} disks, via {args.via}, mean of "
              f"{len(samples)} (each with {args.settle:g} s after it):")
        print(f"  agent incl. children: {agent:.2f} ms CPU per disk "
              f"(idle for the same stretch: {idle_agent:.2f}; net {agent - idle_agent:.2f})")
        print(f"  QEMU:                 {qemu:.2f} ms CPU per disk "
              f"(idle {idle.qemu * 1000 / n:.2f})")
        print(f"  wall per transaction: {statistics.median(s.wall for s in samples) * 1000:.0f} ms")
        per = 1000 / n / len(samples)
        spent = {t: (u - by_thread.get(t, (0.0, 0.0))[0], s - by_thread.get(t, (0.0, 0.0))[1])
                 for t, (u, s) in after.items()}
        print("  agent's threads, ms CPU per disk (user + system): " + ", ".join(
            f"{t} {u * per:.2f} + {s * per:.2f}" for t, (u, s) in
            sorted(spent.items(), key=lambda ts: -sum(ts[1])) if u + s > 0))
        kids = statistics.fmean(s.children for s in samples) * 1000 / n
        print(f"  of which processes it ran: {kids:.2f} ms CPU per disk; live child "
              f"processes: {before} before, at most {most} after a transaction")
        return 0
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait()
        if lab is not None:
            lab.close()
        if own:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
