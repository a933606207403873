"""Benchmark: latency of one backup transaction with zero dirty data, against the
floor of QEMU's own single-process grouped transaction on the same VM.

    .venv/bin/python bench/txn_latency.py [--reps 15] [--disks 2 8]

Prints medians (ms) and ratios to the floor, measured in one run on this machine
(shared, noisy: compare ratios, not absolute times).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qemu.qmp import EventListener, QMPClient

from blocktxn.demo.lab import LabVm
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb
from tests.integration.cluster import Cluster
from tests.integration.harness import Host


async def qemu_floor(vm: LabVm, disks: list[str], reps: int) -> list[float]:
    """transaction(grouped) of N incremental backups, zero dirty → all concluded."""
    q = QMPClient("bench")
    await q.connect(str(vm.probe_socket))
    for d in disks:
        await q.execute("block-dirty-bitmap-add", {"node": d, "name": "bench"})
    times = []
    for r in range(reps):
        for d in disks:
            await q.execute("blockdev-add", {"driver": "null-co", "node-name": f"t{r}{d}",
                                             "size": vm.disks[0].size})
        listener = EventListener(("JOB_STATUS_CHANGE",))
        q.register_listener(listener)
        t0 = time.perf_counter()
        await q.execute("transaction", {"actions": [
            {"type": "blockdev-backup", "data": {
                "job-id": f"j{r}{d}", "device": d, "target": f"t{r}{d}", "sync": "incremental",
                "bitmap": "bench"}} for d in disks],
            "properties": {"completion-mode": "grouped"}})
        left = {f"j{r}{d}" for d in disks}
        async for ev in listener:
            data = cast(dict[str, Any], ev["data"])
            if data["status"] == "null":
                left.discard(data["id"])
                if not left:
                    break
        times.append((time.perf_counter() - t0) * 1000)
        q.remove_listener(listener)
        for d in disks:
            await q.execute("blockdev-del", {"node-name": f"t{r}{d}"})
    await q.disconnect()
    return times


def agent_path(host: Host, disks: list[str], reps: int) -> list[float]:
    members = [("vm1", d) for d in disks]
    host.backup("base", members, quiesce=apb.QUIESCE_NONE)
    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        vote = host.backup(f"b{r}", members, quiesce=apb.QUIESCE_NONE,
                           mode=apb.BACKUP_MODE_INCREMENTAL)
        times.append((time.perf_counter() - t0) * 1000)
        assert vote.yes
    return times


def coordinator_path(cluster: Cluster, targets: list[str], reps: int) -> list[float]:
    cluster.wait_done(cluster.start(targets).txn_id)
    times = []
    stub = cluster.stub()
    for _ in range(reps):
        t0 = time.perf_counter()
        txn = stub.StartTransaction(cpb.StartTransactionRequest(
            targets=[cpb.Target(target=t) for t in targets], mode=apb.BACKUP_MODE_INCREMENTAL),
            timeout=30)
        for t in stub.WatchTransaction(cpb.GetTransactionRequest(txn_id=txn.txn_id)):
            done = t
        times.append((time.perf_counter() - t0) * 1000)
        assert done.decision == cpb.DECISION_COMMIT, done.reason
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--disks", type=int, nargs="+", default=[2, 8])
    args = p.parse_args()
    rows = []
    for n in args.disks:
        disks = [f"d{i}" for i in range(n)]
        with tempfile.TemporaryDirectory() as tmp:
            host = Host(Path(tmp) / "h", {"vm1": disks})
            host.start_agent()
            try:
                floor = statistics.median(asyncio.run(qemu_floor(host.vms["vm1"], disks,
                                                                 args.reps)))
                agent = statistics.median(agent_path(host, disks, args.reps))
            finally:
                host.close()
        with tempfile.TemporaryDirectory() as tmp:
            cluster = Cluster(Path(tmp), replicas=1)
            try:
                per = max(1, n // 2)
                for h in ("h1", "h2"):
                    cluster.add_host(h, {"vm1": [f"d{i}" for i in range(per)]})
                cluster.wait_registered(2)
                coord = statistics.median(coordinator_path(cluster, ["h1/vm1", "h2/vm1"],
                                                           args.reps))
            finally:
                cluster.close()
        rows.append((n, floor, agent, coord))
    print(f"{'disks':>5} {'QEMU grouped (floor)':>21} {'agent 2PC':>10} {'x floor':>8} "
          f"{'coordinator, 2 agents':>22} {'x floor':>8}")
    for n, floor, agent, coord in rows:
        print(f"{n:>5} {floor:>18.1f} ms {agent:>7.1f} ms {agent / floor:>7.1f}x "
              f"{coord:>19.1f} ms {coord / floor:>7.1f}x")


if __name__ == "__main__":
    main()
