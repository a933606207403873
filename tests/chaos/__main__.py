"""``python -m tests.chaos --seed N --duration SECONDS``: a Jepsen-style run.
``python -m tests.chaos --seeds 1-12 --duration SECONDS``: one run per seed, one
after the other (each in a lab of its own), then an aggregate table of fault kind
x step, the totals and the invariant violations of all of them.

The parent (root namespace) builds the lab (blackhole route first, namespaces,
bridge, a tmpfs repository per agent host), runs the driver inside the client
namespace, and tears everything down on success, failure and Ctrl-C. Exit 0
only if no invariant was violated (and, with --seeds, every run finished).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.chaos import netlab
from tests.chaos.cluster import CLIENT, COORDS, ETCD, HOSTS, REPO_SIZE

LOCK = Path("/run/lock/blocktxn-chaos.lock")  # one lab on the machine at a time


def parent(args: argparse.Namespace, seed: int, summary: Path | None = None) -> int:
    # The lab's namespaces have fixed names and teardown() kills whatever runs in them:
    # a second run (another checkout's test suite) waits here instead of killing this one.
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another chaos lab is running: waiting for {LOCK}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _parent(args, seed, summary)


def _parent(args: argparse.Namespace, seed: int, summary: Path | None = None) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="blocktxn-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    mounts: list[Path] = []
    net = netlab.NetLab()

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        netlab.teardown()  # leftovers of an earlier, killed run
        net.setup([CLIENT, *ETCD, *COORDS, *HOSTS])
        for h in HOSTS:
            repo = workdir / h / "agent" / "repo"
            repo.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={REPO_SIZE}", "tmpfs",
                            str(repo)], check=True)
            mounts.append(repo)
        child = subprocess.run([*net.exec_prefix(CLIENT), sys.executable, "-m", "tests.chaos",
                                "--child", "--seed", str(seed), "--duration",
                                str(args.duration), "--min-transactions",
                                str(args.min_transactions), "--workdir", str(workdir),
                                "--hosts", json.dumps(net.hosts),
                                *(["--faults", args.faults] if args.faults else []),
                                *(["--summary", str(summary)] if summary else [])])
        if child.returncode not in (0, 130) and not args.workdir:
            keep_logs(workdir, Path(f"/tmp/chaos-logs-seed{seed}"))
        return child.returncode
    except KeyboardInterrupt:
        print("interrupted: tearing the lab down")
        return 130
    finally:
        netlab.teardown()
        for m in mounts:
            subprocess.run(["umount", "-l", str(m)], check=False)
        if not args.keep_files and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def keep_logs(workdir: Path, dest: Path) -> None:
    """Copy the daemons' logs of a failed run (not the images) for a post-mortem."""
    shutil.rmtree(dest, ignore_errors=True)
    for log in workdir.rglob("*.log"):
        target = dest / log.relative_to(workdir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, target)
    print(f"logs of the failed run kept in {dest}")


def child(args: argparse.Namespace) -> int:
    from blocktxn.v1 import coordinator_pb2 as cpb
    from tests.chaos.cluster import HAVE_QEMU_SYSTEM, ChaosCluster
    from tests.chaos.run import Driver

    net = netlab.NetLab(hosts=json.loads(args.hosts))
    cluster = ChaosCluster(net, Path(args.workdir))

    def log(text: str) -> None:
        print(text, flush=True)

    started = time.monotonic()
    try:
        cluster.start()
        cluster.wait_ready()
        log(f"chaos: seed {args.seed}, {args.duration:g}s, lab up in "
            f"{time.monotonic() - started:.1f}s")
        if not HAVE_QEMU_SYSTEM:
            log("chaos: qemu-system-x86_64 is missing: no pausable VM, pause faults skipped")
        faults = tuple(args.faults.split(",")) if args.faults else None
        history = Driver(cluster, args.seed, args.duration, log, faults,
                         args.min_transactions).run()
    finally:
        cluster.stop_all()
    committed = sum(1 for r in history.runs if r.final.decision == cpb.DECISION_COMMIT)
    print("\n== chaos summary ==")
    print(f"seed {args.seed}: {len(history.runs)} transactions, {committed} committed, "
          f"{len(history.runs) - committed} aborted")
    print(f"concurrent transactions refused at the start: {history.refused}; "
          f"commits refused by the agent_commit failpoint: {history.commit_refusals}; "
          f"sets removed by retention: {history.removed}")
    print("faults injected (kind @ step):")
    for (kind, step), n in sorted(history.faults.items()):
        print(f"  {kind:16s} @ {step:8s} {n}")
    print(f"invariant violations: {len(history.violations)}")
    for v in history.violations:
        print(f"  - {v}")
    if history.violations:
        print(f"reproduce with: python -m tests.chaos --seed {args.seed} "
              f"--duration {args.duration:g}")
    if args.summary:
        Path(args.summary).write_text(json.dumps({
            "seed": args.seed, "transactions": len(history.runs), "committed": committed,
            "refused": history.refused, "commit_refusals": history.commit_refusals,
            "removed": history.removed,
            "faults": [[k, s, n] for (k, s), n in history.faults.items()],
            "violations": history.violations}))
    return 1 if history.violations else 0


def parse_seeds(text: str) -> list[int]:
    """``1-12`` or ``3,5,9-11``."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += range(int(lo), int(hi or lo) + 1)
    return seeds


def table(results: list[dict[str, Any]], missing_runs: list[int], duration: float) -> str:
    from tests.chaos.run import CUT_ONLY, FAULTS, PRUNE_STEPS, STEPS

    faults: Counter[tuple[str, str]] = Counter()
    for r in results:
        for kind, step, n in r["faults"]:
            faults[(kind, step)] += n
    other = sorted({s for _, s in faults} - set(STEPS) - set(PRUNE_STEPS))
    cols = [*STEPS, *PRUNE_STEPS, *other]
    kinds = [*FAULTS, *sorted({k for k, _ in faults} - set(FAULTS))]
    lines = [f"== chaos aggregate: seeds {','.join(str(r['seed']) for r in results)}, "
             f"{duration:g}s each ==",
             f"{'fault kind':18s}" + "".join(f"{c:>9s}" for c in cols) + f"{'total':>8s}"]
    for k in kinds:
        row = [faults[(k, c)] for c in cols]
        lines.append(f"{k:18s}" + "".join(f"{n:9d}" for n in row) + f"{sum(row):8d}")
    total = sum(r["transactions"] for r in results)
    committed = sum(r["committed"] for r in results)
    lines.append(f"{'total':18s}" + "".join(f"{sum(faults[(k, c)] for k in kinds):9d}"
                                             for c in cols) + f"{total:8d}")
    def steps_of(kind: str) -> tuple[str, ...]:
        return ("cut",) if kind in CUT_ONLY else PRUNE_STEPS if kind == "prune_crash" else STEPS

    unhit = [f"{k}@{s}" for k in FAULTS for s in steps_of(k) if not faults[(k, s)]]
    lines.append(f"transactions: {total} ({committed} committed, {total - committed} aborted)"
                 f"; concurrent refused at start: {sum(r['refused'] for r in results)}"
                 f"; commits refused by the failpoint: "
                 f"{sum(r['commit_refusals'] for r in results)}"
                 f"; sets removed by retention (checked gone): "
                 f"{sum(r.get('removed', 0) for r in results)}")
    lines.append("per seed: " + ", ".join(f"{r['seed']}:{r['transactions']}/"
                                           f"{len(r['violations'])}v" for r in results))
    lines.append("fault kinds not hit at a step they apply to: "
                 + (", ".join(unhit) if unhit else "none"))
    if missing_runs:
        lines.append(f"runs that did not finish (no summary): seeds {missing_runs}")
    violations = [(r["seed"], v) for r in results for v in r["violations"]]
    lines.append(f"invariant violations: {len(violations)}")
    lines += [f"  - seed {s}: {v}" for s, v in violations]
    return "\n".join(lines)


def many(args: argparse.Namespace) -> int:
    seeds = parse_seeds(args.seeds)
    results: list[dict[str, Any]] = []
    missing: list[int] = []
    with tempfile.TemporaryDirectory(prefix="blocktxn-chaos-sums-") as tmp:
        sums = Path(args.summaries or tmp)  # --summaries: kept, and earlier seeds counted
        sums.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            print(f"\n######## seed {seed} ({len(results) + len(missing) + 1}/{len(seeds)})",
                  flush=True)
            summary = sums / f"{seed}.json"
            summary.unlink(missing_ok=True)
            rc = parent(args, seed, summary)
            if rc == 130:
                break
            if summary.exists():
                results.append(json.loads(summary.read_text()))
            else:
                missing.append(seed)
        if args.summaries:  # the seeds of earlier runs into the same directory
            results += [json.loads(f.read_text()) for f in sorted(sums.glob("*.json"))
                        if f.stem.isdigit() and int(f.stem) not in seeds]
            results.sort(key=lambda r: int(r["seed"]))
    out = table(results, missing, args.duration)
    print("\n" + out)
    if args.table:
        Path(args.table).write_text(out + "\n")
    bad = sum(len(r["violations"]) for r in results)
    return 0 if results and not bad and not missing else 1


def main() -> int:
    from tests.chaos.run import MAX_OVERRUN
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--seeds", help="several runs, e.g. 1-12 or 3,5,9-11")
    p.add_argument("--duration", type=float, default=120.0, help="seconds per seed")
    p.add_argument("--min-transactions", type=int, default=0, metavar="N",
                   help="run on past the duration until N transactions were run "
                        f"(0-100, default 0; it still stops {MAX_OVERRUN:g}s after the "
                        "duration at the latest): a slow machine then runs as many as "
                        "a fast one")
    p.add_argument("--table", help="with --seeds: also write the aggregate table here")
    p.add_argument("--summaries", help="with --seeds: keep each seed's summary in this "
                   "directory, and count the seeds an earlier run left there (a long run "
                   "made in parts: --seeds 1-8, then --seeds 9-16, same directory)")
    p.add_argument("--faults", help="only these fault kinds (comma-separated), to debug one")
    p.add_argument("--workdir")
    p.add_argument("--keep-files", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--hosts", help=argparse.SUPPRESS)
    p.add_argument("--summary", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not 0 <= args.min_transactions <= 100:
        p.error("--min-transactions must be 0-100")
    if args.child:
        return child(args)
    if args.seeds:
        return many(args)
    return parent(args, args.seed)


if __name__ == "__main__":
    raise SystemExit(main())
