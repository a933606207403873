"""``python -m tests.chaos --seed N --duration SECONDS``: a Jepsen-style run.

The parent (root namespace) builds the lab (blackhole route first, namespaces,
bridge, a tmpfs repository per agent host), runs the driver inside the client
namespace, and tears everything down on success, failure and Ctrl-C. Exit 0
only if no invariant was violated.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.chaos import netlab
from tests.chaos.cluster import CLIENT, COORDS, ETCD, HOSTS, REPO_SIZE


def parent(args: argparse.Namespace) -> int:
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
                                "--child", "--seed", str(args.seed), "--duration",
                                str(args.duration), "--workdir", str(workdir),
                                "--hosts", json.dumps(net.hosts)])
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


def child(args: argparse.Namespace) -> int:
    from tests.chaos.cluster import ChaosCluster
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
        history = Driver(cluster, args.seed, args.duration, log).run()
    finally:
        cluster.stop_all()
    committed = sum(1 for r in history.runs if r.final.decision == 1)
    print("\n== chaos summary ==")
    print(f"seed {args.seed}: {len(history.runs)} transactions, {committed} committed, "
          f"{len(history.runs) - committed} aborted")
    print("faults injected (kind @ step):")
    for (kind, step), n in sorted(history.faults.items()):
        print(f"  {kind:12s} @ {step:8s} {n}")
    print(f"invariant violations: {len(history.violations)}")
    for v in history.violations:
        print(f"  - {v}")
    if history.violations:
        print(f"reproduce with: python -m tests.chaos --seed {args.seed} "
              f"--duration {args.duration:g}")
    return 1 if history.violations else 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=120.0)
    p.add_argument("--workdir")
    p.add_argument("--keep-files", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--hosts", help=argparse.SUPPRESS)
    args = p.parse_args()
    return child(args) if args.child else parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
