"""``python -m tests.soak [--transactions 2000] [--out DIR] [--seed N]``: can blocktxn
run for a year unattended?

A private etcd, one coordinator with the retention policy
``soak=keep-last=5,keep-daily=7,keep-weekly=4``, and 2 agents x 2 VMs x 2 disks of
4 MiB (qemu-storage-daemon, writers running all the time, stand-in guest agents that
freeze the writers and record each disk's exact content at every cut). Transactions
run back to back, grouped, quiesce freeze, every VM; the coordinator's set clock
moves on 6 h per transaction (BLOCKTXN_CLOCK_FILE), so 2,000 transactions are ~500
days of four backups a day; the automatic prune runs after each commit. About 7% of
the transactions get a fault (a read error under a disk, ``agent_commit=fail`` for a
few seconds, agent h2 SIGKILLed and restarted). See ``run.py`` for every check and
``report.py`` for the plateau rule.

Writes ``soak.csv`` and ``soak.png`` (the curves against the transaction count) to
``--out``, prints a summary and exits 0 only if every check passed and every curve
plateaus (``--plateau report``: the verdicts are printed but not enforced).
The soak compresses time, so the daemons' time-based upkeep is scaled down with it:
``--keep-finished`` and ``--keep-audit`` (default 120s each: the audit trail of every
StartTransaction is kept 90 days in the product), etcd's auto-compaction window (default 1m;
``--etcd-compaction product`` keeps the product's hour). etcd's --snapshot-count is
the product's 10000 (about 1,000 transactions) unless ``--etcd-snapshot-count N``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from tests.soak import report
from tests.soak.run import Options, main


def parse(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Options()
    p.add_argument("--transactions", type=int, default=d.transactions)
    p.add_argument("--every", type=int, default=d.every,
                   help="sample the curves and run the checks every N transactions")
    p.add_argument("--out", type=Path, default=d.out, help="where soak.csv and soak.png go")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--hours", type=float, default=d.hours,
                   help="simulated hours per transaction")
    p.add_argument("--fault-rate", type=float, default=d.fault_rate)
    p.add_argument("--agents", type=int, default=d.agents)
    p.add_argument("--vms", type=int, default=d.vms, help="VMs per agent")
    p.add_argument("--disks", type=int, default=d.disks, help="disks per VM")
    p.add_argument("--disk-mib", type=int, default=d.disk_mib)
    p.add_argument("--write-interval", type=float, default=d.write_interval,
                   help="seconds between two writes of each VM's writer")
    p.add_argument("--keep-finished", default=d.keep_finished,
                   help="the coordinator's --keep-finished (if it has one)")
    p.add_argument("--keep-audit", default=d.keep_audit,
                   help="the coordinator's --keep-audit (if it has one)")
    p.add_argument("--etcd-compaction", default=d.etcd_compaction,
                   help="etcd periodic auto-compaction window, or 'product'")
    p.add_argument("--etcd-snapshot-count", default=d.etcd_snapshot_count,
                   help="etcd --snapshot-count (raft entries kept in memory between "
                   "snapshots), or 'product' for the product's 10000")
    p.add_argument("--plateau", choices=("enforce", "report"), default=d.plateau)
    p.add_argument("--no-prune-gap", dest="prune_gap", action="store_false",
                   help="start the next backup at once, without waiting for the prune of "
                   "the last commit (back-to-back stress: the prune then lags)")
    p.add_argument("--workdir", type=Path, help="keep the run's files here (default: a "
                   "temporary directory, removed at the end)")
    p.add_argument("--keep-files", action="store_true")
    p.add_argument("--judge", type=Path, metavar="CSV",
                   help="only judge the curves of an earlier run's soak.csv (and redraw its "
                   "PNG next to it): no cluster is started")
    a = p.parse_args(argv)
    if a.transactions < 1 or a.every < 1 or a.agents < 1 or a.vms < 1 or a.disks < 1 \
            or a.disk_mib < 1 or not 0 <= a.fault_rate <= 1:
        p.error("counts must be >= 1 and --fault-rate within 0..1")
    if a.judge:
        return Options(out=a.judge, plateau="judge")
    return Options(transactions=a.transactions, every=a.every, out=a.out, seed=a.seed,
                   hours=a.hours, fault_rate=a.fault_rate, agents=a.agents, vms=a.vms,
                   disks=a.disks, disk_mib=a.disk_mib, write_interval=a.write_interval,
                   keep_finished=a.keep_finished, keep_audit=a.keep_audit,
                   etcd_compaction=a.etcd_compaction,
                   etcd_snapshot_count=a.etcd_snapshot_count,
                   plateau=a.plateau, prune_gap=a.prune_gap,
                   workdir=a.workdir, keep_files=a.keep_files)


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def judge(csv_path: Path) -> int:
    """The verdicts of an earlier run's CSV under the current rule; 0 if all plateau."""
    rows = report.read_csv(csv_path)
    agents = sorted(c.removeprefix("repo_bytes_") for c in rows[0] if
                    c.startswith("repo_bytes_")) if rows else []
    verdicts = [report.judge(c, rows) for c in report.curves(agents)]
    print(report.RULE)
    print(report.table(verdicts))
    report.plot(csv_path.with_suffix(".png"), rows, verdicts,
                f"blocktxn soak: {csv_path} ({int(rows[-1]['txns']) if rows else 0} "
                "transactions), judged again")
    return 0 if all(v.ok for v in verdicts) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)
    opts = parse(sys.argv[1:])
    sys.exit(judge(opts.out) if opts.plateau == "judge" else main(opts))
