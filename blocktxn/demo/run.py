"""`blocktxn demo`: a real cluster on one machine, narrated, checked, torn down.

A private etcd, one coordinator, three agents (hosts) with two VMs each
(qemu-storage-daemon, two qcow2 disks exported over NBD), and a workload that
writes causally ordered records across VMs: record i is written only after
record i-1 was acknowledged (maybe on another VM), and it lands in cluster i
of its disk, so a restore holds record i only if the cut came after it.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from blocktxn import procs
from blocktxn.client import BackupOptions, SyncClient
from blocktxn.demo.guest import StandInGuestAgent, Workload, close_guests
from blocktxn.demo.lab import (
    CLUSTER,
    AgentProcess,
    LabVm,
    dirty_counts,
    free_port,
    images_equal,
    top_layer_clusters,
)

if TYPE_CHECKING:
    from blocktxn.demo.real import RealGuestDemo

HOSTS = ("h1", "h2", "h3")
VMS = ("web", "db")
DISKS = ("d0", "d1")
FAULTY = ("h2", "db", "d1")  # the disk that gets an injected read error


class Demo:
    example = "blocktxn backup h1/web h3/db --quiesce freeze --wait"

    def __init__(self, workdir: Path, console: Console) -> None:
        self.workdir = workdir
        self.console = console
        self.checks: list[tuple[str, bool]] = []
        self.txns: list[tuple[str, str, int, float]] = []  # id, state, bytes, max freeze
        self.vms: dict[tuple[str, str], LabVm] = {}
        self.workloads: dict[tuple[str, str], Workload] = {}
        self.gas: dict[tuple[str, str], StandInGuestAgent] = {}
        self.agents: list[AgentProcess] = []
        self.records: list[tuple[str, str, str]] = [("", "", "")]  # index = record number
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self.coordinator_port = free_port()
        self.coordinator: Any = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.coordinator_port}"

    def say(self, text: str) -> None:
        self.console.print(f"[bold cyan]>>[/] {text}")

    def check(self, name: str, ok: bool) -> bool:
        self.checks.append((name, ok))
        self.console.print(f"   {'[green]PASS[/]' if ok else '[red]FAIL[/]'} {name}")
        return ok

    # ------------------------------------------------------------- cluster
    def start(self) -> None:
        import subprocess

        self.say("starting a coordinator with its private etcd")
        self.coordinator = subprocess.Popen(
            [*procs.DIE_WITH_PARENT, sys.executable, "-m", "blocktxn.coordinator",
             "--listen", self.address,
             "--name", "coord1", "--data-dir", str(self.workdir / "coordinator")],
            stdout=subprocess.DEVNULL, stderr=open(self.workdir / "coordinator.log", "ab"))
        self.say(f"starting {len(HOSTS)} hosts x {len(VMS)} VMs x {len(DISKS)} disks "
                 "(qemu-storage-daemon, qcow2 over NBD) and their agents")
        for h in HOSTS:
            lab_vms = []
            for v in VMS:
                faulty = (h, v) == FAULTY[:2]
                vm = LabVm.create(v, self.workdir / h / v, list(DISKS),
                                  read_error_disks=(FAULTY[2],) if faulty else ())
                vm.prefix = procs.DIE_WITH_PARENT  # nothing outlives a killed demo
                vm.start()
                wl = Workload(vm)
                wl.attach()
                self.vms[(h, v)], self.workloads[(h, v)] = vm, wl
                self.gas[(h, v)] = StandInGuestAgent(self.workdir / h / v / "ga.sock", wl)
                lab_vms.append(vm)
            agent = AgentProcess(h, self.workdir / h / "agent", lab_vms,
                                 {v: self.gas[(h, v)].path for v in VMS},
                                 extra=["--coordinator", self.address],
                                 prefix=procs.DIE_WITH_PARENT)
            agent.start()
            self.agents.append(agent)
        client = SyncClient(self.address, timeout=5)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if sum(1 for a in client.agents() if a.live and a.inventory.vms) == len(HOSTS):
                    break
            except Exception:  # the coordinator may not be up yet
                pass
            time.sleep(0.3)
        else:
            raise RuntimeError("agents did not register with the coordinator")
        for wl in self.workloads.values():
            wl.write(DISKS[0], 0)  # cluster 0 of every disk: reserved for fault injection
            wl.write(DISKS[1], 0)

    def start_writer(self) -> None:
        self.say("workload: causally ordered records across all six VMs")
        rng = random.Random(7)
        keys = list(self.workloads)
        limit = self.vms[keys[0]].disks[0].size // CLUSTER

        def loop() -> None:
            for i in range(1, limit):
                if self._stop.is_set():
                    return
                h, v = rng.choice(keys)
                d = rng.choice(DISKS)
                self.workloads[(h, v)].write(d, i)   # acknowledged before record i+1
                self.records.append((h, v, d))
                time.sleep(0.01)

        self._writer = threading.Thread(target=loop, daemon=True)
        self._writer.start()

    def stop(self) -> None:
        self._stop.set()
        if self._writer:
            self._writer.join(10)
        for a in self.agents:
            a.stop()
        close_guests(self.gas.values(), self.workloads.values(), self.vms.values())
        if self.coordinator and self.coordinator.poll() is None:
            self.coordinator.terminate()
            self.coordinator.wait(30)  # it stops its private etcd

    # -------------------------------------------------------------- story
    def backup(self, title: str, mode: str) -> Any:
        self.say(title)
        client = SyncClient(self.address, timeout=60)
        targets = [f"{h}/{v}" for h in HOSTS for v in VMS]
        txn = client.backup(targets, BackupOptions(mode=mode, quiesce="freeze",
                                                   freeze_timeout=5))
        done = client.wait(txn.txn_id)
        state = "committed" if done.decision == 1 else "aborted"
        freeze = max((e - s for ga in self.gas.values() for s, e in ga.frozen_intervals[-1:]),
                     default=0.0)
        nbytes = sum(m.bytes_done for m in done.members)
        self.txns.append((done.txn_id, state, nbytes, freeze))
        self.console.print(f"   {done.txn_id}: {state} {done.reason}".rstrip()
                           + f" ({nbytes} bytes, longest freeze {freeze * 1000:.1f} ms)")
        return done

    def run(self) -> bool:
        self.start()
        self.start_writer()
        time.sleep(0.5)
        t1 = self.backup("1. full grouped backup of all 6 VMs, guests frozen together", "full")
        self.check("full backup committed", t1.decision == 1)
        time.sleep(0.5)
        t2 = self.backup("2. incremental backup", "incremental")
        self.check("incremental committed", t2.decision == 1)
        cut2 = {k: ga.cuts[-1].seq for k, ga in self.gas.items()}
        time.sleep(0.5)
        self.say(f"3. incremental with an injected read error on {'/'.join(FAULTY)}")
        faulty_wl = self.workloads[FAULTY[:2]]
        faulty_wl.arm_read_error(FAULTY[2], 0)
        t3 = self.backup("   (blkdebug: the next read of that disk fails with EIO)",
                         "incremental")
        self.check("transaction with the failing disk aborted everywhere",
                   t3.decision == 2 and {m.outcome for m in t3.members} == {"aborted"})
        kept = True
        for (h, v), vm in self.vms.items():
            for d in DISKS:
                bitmaps = dirty_counts(vm, d)
                name = f"blocktxn:{t2.txn_id}"
                written = self.workloads[(h, v)].clusters(d, cut2[(h, v)])
                kept &= set(bitmaps) == {name} and bitmaps[name] >= len(written) * CLUSTER
        self.check("every disk kept its checkpoint, with every write since the last commit",
                   kept)
        t4 = self.backup("4. retried incremental", "incremental")
        if not self.check("retried incremental committed", t4.decision == 1):
            return False
        exact = True
        for (h, v), ga in self.gas.items():
            for d in DISKS:
                image = self.agents[HOSTS.index(h)].repo / f"images/{v}/{d}/{t4.txn_id}.qcow2"
                written = self.workloads[(h, v)].clusters(d, cut2[(h, v)], ga.cuts[-1].seq)
                exact &= top_layer_clusters(image) == written
        self.check("it holds exactly every change since the last committed set", exact)
        self._stop.set()
        self.say(f"5. restore of set {t4.txn_id}: every disk, checked against the cut")
        client = SyncClient(self.address, timeout=60)
        equal, present = True, set()
        for (h, v), ga in self.gas.items():
            agent = self.agents[HOSTS.index(h)]
            for d in DISKS:
                out = agent.restore_dir / f"{h}-{v}-{d}.raw"
                client.restore(t4.txn_id, f"{h}/{v}/{d}", str(out))
                equal &= images_equal(out, "raw", ga.cuts[-1].images[d], "raw")
                with open(out, "rb") as f:
                    for i, (rh, rv, rd) in enumerate(self.records):
                        if i and (rh, rv, rd) == (h, v, d):
                            f.seek(i * CLUSTER)
                            if f.read(1) != b"\0":
                                present.add(i)
        self.check("every restored disk equals its content at the cut", equal)
        causal = all(i - 1 in present or i == 1 for i in present)
        self.check(f"causal consistency across VMs: {len(present)} records restored, "
                   "each with its predecessor", causal and bool(present))
        self.check("verify: qemu-img check and checksums of every chain",
                   client.verify(t4.txn_id).ok)
        return all(ok for _, ok in self.checks)

    def summary(self) -> None:
        table = Table(title="blocktxn demo")
        for c in ("transaction", "outcome", "bytes", "longest freeze"):
            table.add_column(c)
        for txn_id, state, nbytes, freeze in self.txns:
            table.add_row(txn_id, state, str(nbytes), f"{freeze * 1000:.1f} ms")
        self.console.print(table)
        passed = sum(1 for _, ok in self.checks if ok)
        self.console.print(f"checks passed: {passed}/{len(self.checks)}")


def main(argv: list[str]) -> int:
    """``blocktxn demo [--real-guests] [--workdir DIR] [--keep]``."""
    p = argparse.ArgumentParser(prog="blocktxn demo", description=__doc__)
    p.add_argument("--real-guests", action="store_true",
                   help="two hosts with one booted Linux guest each (built from Debian "
                        "packages, frozen through qemu-guest-agent) instead of six "
                        "qemu-storage-daemon VMs")
    p.add_argument("--workdir", help="where the demo keeps its files (default: a temp dir, "
                   "removed when the demo passes)")
    p.add_argument("--keep", action="store_true", help="leave the cluster running at the end")
    args = p.parse_args(argv)

    def stop_on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM/SIGHUP stop the demo like Ctrl-C: all of it

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop_on_signal)
    console = Console()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="blocktxn-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    demo: Demo | RealGuestDemo
    if args.real_guests:
        from blocktxn.demo.real import RealGuestDemo

        demo = RealGuestDemo(workdir, console)
    else:
        demo = Demo(workdir, console)
    ok = False
    try:
        ok = demo.run()
        demo.summary()
        if args.keep:
            console.print(f"\nThe cluster keeps running (files in {workdir}). Try:\n"
                          f"  export BLOCKTXN_COORDINATOR={demo.address}\n"
                          "  blocktxn agents\n  blocktxn sets list\n  blocktxn txn list\n"
                          f"  {demo.example}\n"
                          "Ctrl-C stops everything.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        demo.stop()
        if ok and not args.workdir:  # its images take about 1.7 GB: never left behind
            shutil.rmtree(workdir, ignore_errors=True)
    if not ok:
        console.print(f"logs and images are in {workdir}")
    console.print("[green]demo passed[/]" if ok else "[red]demo FAILED[/]")
    return 0 if ok else 1
