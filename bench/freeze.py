"""Section ``freeze``: the cross-VM freeze window of grouped transactions with quiesce
``freeze``: 6 VMs on 3 hosts (``web`` with 1 disk and ``db`` with 2 on each), every
workload writing all the time, through the coordinator.

The window of one transaction is from the first VM frozen to the last VM thawed. Its
source is the transaction record that ``GetTransaction``/``WatchTransaction`` return:
``thawed_at - frozen_from``, exact per transaction (each agent stamps ``frozen_at``
just before its first freeze call and ``thawed_at`` once its last thaw answered; the
record keeps the earliest and the latest). The coordinator's freeze histogram only
has bucket bounds, and the agents' log lines ("vm X thawed after N ms") are per VM;
both are shown as cross-checks, with what the stand-in guest agents saw (their own
frozen intervals: the guest's view).

The floor, measured in turn with the transactions on the same VMs: one direct script
freezes all 6 guest agents at once, starts each VM's backup jobs in one QMP
``transaction``, and thaws all 6 (the same guest-agent client the agent uses).
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime
from pathlib import Path

from blocktxn.agent.qemu.guest_agent import GuestAgentClient
from blocktxn.demo.lab import LabVm
from blocktxn.v1 import agent_pb2 as apb
from tests.integration.cluster import Cluster
from tests.integration.harness import Host

from .floors import Qmp, add_null_targets, incremental_backups
from .latency import add_hosts, coordinator_txn
from .report import Row, percentile, ratio

VMS = {"web": ["d0"], "db": ["d0", "d1"]}
HOSTS = ("h1", "h2", "h3")
# small disks: the stand-in guest agent copies each disk's shadow at every freeze,
# inside the window (product and floor alike)
DISK_SIZE = 4 << 20
CASE = "6 VMs on 3 hosts"
THAWED = re.compile(r"txn (\S+): vm (\S+) thawed after (\d+) ms")
QUIESCED = re.compile(r"(\S+ \S+) .*txn (\S+): vm \S+ quiesced")


class DirectFreeze:
    """The floor: freeze all, one transaction per VM, thaw all, from one script."""

    def __init__(self, vms: list[tuple[LabVm, Path]], qmps: list[Qmp]) -> None:
        self.vms, self.qmps = vms, qmps
        self.reps = 0

    @classmethod
    async def open(cls, vms: list[tuple[LabVm, Path]]) -> DirectFreeze:
        qmps = [await Qmp.open(vm.probe_socket) for vm, _ in vms]
        for q, (vm, _) in zip(qmps, vms, strict=True):
            await asyncio.gather(*(q.run("block-dirty-bitmap-add",
                                         {"node": d.name, "name": "bench-freeze"})
                                   for d in vm.disks))
        return cls(vms, qmps)

    async def window(self) -> float:
        """ms from the first freeze call to the last thaw's answer."""
        self.reps += 1
        tag = f"f{self.reps}"
        disks = [[d.name for d in vm.disks] for vm, _ in self.vms]
        targets = [await add_null_targets(q, vm, ds, tag)
                   for q, (vm, _), ds in zip(self.qmps, self.vms, disks, strict=True)]
        gas = [GuestAgentClient(str(path)) for _, path in self.vms]
        t0 = time.time()
        await asyncio.gather(*(ga.freeze() for ga in gas))
        await asyncio.gather(*(q.run("transaction", {
            "actions": incremental_backups(ds, "bench-freeze", ts, tag),
            "properties": {"completion-mode": "grouped"}})
            for q, ds, ts in zip(self.qmps, disks, targets, strict=True)))
        await asyncio.gather(*(ga.thaw() for ga in gas))
        elapsed = (time.time() - t0) * 1000
        for q, ds, ts in zip(self.qmps, disks, targets, strict=True):
            await q.wait_jobs([f"bench-{tag}-{d}" for d in ds], "null")
            await asyncio.gather(*(q.run("blockdev-del", {"node-name": t}) for t in ts))
        return elapsed

    async def close(self) -> None:
        for q, (vm, _) in zip(self.qmps, self.vms, strict=True):
            await asyncio.gather(*(q.run("block-dirty-bitmap-remove",
                                         {"node": d.name, "name": "bench-freeze"})
                                   for d in vm.disks), return_exceptions=True)
            await q.close()


def forget_cuts(hosts: list[Host]) -> None:
    """Drop what the stand-in guest agents kept of earlier freezes (their snapshots)."""
    for h in hosts:
        for ga in h.gas.values():
            for cut in ga.cuts:
                for image in cut.images.values():
                    image.unlink(missing_ok=True)
            ga.cuts.clear()
            ga.frozen_intervals.clear()


def guest_window(hosts: list[Host]) -> float:
    """ms from the first freeze to the last thaw the guests saw since forget_cuts."""
    spans = [i for h in hosts for ga in h.gas.values() for i in ga.frozen_intervals]
    if not spans:
        return 0.0
    return (max(e for _, e in spans) - min(s for s, _ in spans)) * 1000


def agent_logs(hosts: list[Host], skip: set[str]) -> tuple[list[float], list[float]]:
    """From the agents' logs (transactions not in *skip*): every VM's hold time, and
    per transaction how far apart the agents' first freezes were (ms; the log's
    timestamps have millisecond resolution)."""
    holds: list[float] = []
    first: dict[str, dict[str, float]] = {}  # txn -> agent -> its first freeze
    for h in hosts:
        log = h.agent.workdir / "agent.log"
        for line in log.read_text(errors="replace").splitlines():
            if (m := THAWED.search(line)) and m.group(1) not in skip:
                holds.append(float(m.group(3)))
            elif (m := QUIESCED.match(line)) and m.group(2) not in skip:
                at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                first.setdefault(m.group(2), {}).setdefault(h.agent.agent_id, at)
    skews = [(max(by.values()) - min(by.values())) * 1000 for by in first.values()
             if len(by) == len(hosts)]
    return holds, skews


def run(work: Path, quick: bool) -> list[Row]:
    n = 10 if quick else 100
    t0 = time.monotonic()
    cluster = Cluster(work)
    hosts: list[Host] = []
    try:
        add_hosts(cluster, {h: VMS for h in HOSTS}, disk_size=DISK_SIZE)
        hosts = [cluster.hosts[h] for h in HOSTS]
        targets = [f"{h}/{vm}" for h in HOSTS for vm in VMS]
        for i, host in enumerate(hosts):
            for j, wl in enumerate(host.workloads.values()):
                wl.start_background(interval=0.02, seed=10 * i + j)
        _, base = coordinator_txn(cluster, targets, apb.BACKUP_MODE_AUTO,
                                  quiesce=apb.QUIESCE_FREEZE)
        print(f"freeze: lab and base backup ready in {time.monotonic() - t0:.0f} s", flush=True)
        record: list[float] = []
        to_cut: list[float] = []  # first freeze -> every agent's cut answered
        guest: list[float] = []
        floor: list[float] = []
        with asyncio.Runner() as runner:
            direct = runner.run(DirectFreeze.open(
                [(vm, h.gas[name].path) for h in hosts for name, vm in h.vms.items()]))
            try:
                for _ in range(n):
                    forget_cuts(hosts)
                    # auto: an incremental, or a full once a chain reaches the agent's
                    # --max-chain (32), as a schedule runs; the copy is after the thaw
                    _, done = coordinator_txn(cluster, targets, apb.BACKUP_MODE_AUTO,
                                              quiesce=apb.QUIESCE_FREEZE)
                    if not done.frozen_from or done.thawed_at < done.frozen_from:
                        raise RuntimeError(f"{done.txn_id}: no freeze window in its record")
                    record.append((done.thawed_at - done.frozen_from) * 1000)
                    to_cut.append((done.cut_done_at - done.frozen_from) * 1000)
                    guest.append(guest_window(hosts))
                    forget_cuts(hosts)
                    floor.append(runner.run(direct.window()))
            finally:
                runner.run(direct.close())
                forget_cuts(hosts)
        holds, skews = agent_logs(hosts, {base.txn_id})
    finally:
        for host in hosts:
            for wl in host.workloads.values():
                wl.stop_background()
        cluster.close()
    rows = [Row("freeze", CASE, "transactions", n, "txns")]
    for p, name in ((50, "p50"), (99, "p99"), (100, "max")):
        f = percentile(floor, p)
        rows.append(Row("freeze", CASE, f"floor_{name}", f, "ms"))
        rows.append(Row("freeze", CASE, name, percentile(record, p), "ms", f"floor_{name}",
                        ratio(percentile(record, p), f)))
    p50 = percentile(record, 50)
    rows.append(Row("freeze", CASE, "window_until_cut_answered_p50", percentile(to_cut, 50),
                    "ms", "p50", ratio(percentile(to_cut, 50), p50)))
    for p, name in ((50, "p50"), (100, "max")):
        rows.append(Row("freeze", CASE, f"guest_seen_{name}", percentile(guest, p), "ms",
                        name, ratio(percentile(guest, p), percentile(record, p))))
    rows.append(Row("freeze", CASE, "one_vm_hold_p50 (agent log)", percentile(holds, 50),
                    "ms", "p50", ratio(percentile(holds, 50), p50)))
    skew = percentile(skews, 50)  # 0: within the log's millisecond (no ratio then)
    rows.append(Row("freeze", CASE, "first_freeze_skew_p50 (agent log)", skew, "ms",
                    "p50" if skew > 0 else "", ratio(skew, p50) if skew > 0 else None))
    return rows
