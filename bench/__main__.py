"""The benchmark suite in one run: ``python -m bench [--out DIR] [--quick] [--only S]``.

Sections: latency (and chain), freeze, full, incremental, libvirt, scale (``bench.sim`` when
it is there). Prints every measurement with its ratio to a floor measured in the same
run, and writes ``bench.csv`` and ``bench.png`` into ``--out`` (default: a new
directory under /tmp). See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from . import datapath, freeze, hypervisors, latency
from .report import Row, plot, table, write_csv

SECTIONS = ("latency", "freeze", "full", "incremental", "libvirt", "scale")


def run_scale(quick: bool) -> list[Row]:
    """Section scale: ``bench.sim.run_scale`` if that module exists."""
    try:
        sim = importlib.import_module("bench.sim")
    except ModuleNotFoundError as err:
        if err.name != "bench.sim":
            raise
        print("scale: skipped (bench/sim.py is not there)", flush=True)
        return []
    rows: list[Row] = sim.run_scale(quick)
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="where bench.csv and bench.png go "
                   "(default: a new directory under /tmp)")
    p.add_argument("--quick", action="store_true",
                   help="everything small (about 2 minutes)")
    p.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                   help=f"run this section only (repeatable): {', '.join(SECTIONS)}")
    p.add_argument("--workdir", type=Path,
                   help="where the labs run (default: a new directory under /tmp, removed "
                        "at the end)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    chosen = [s for s in SECTIONS if not args.only or s in args.only]
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="blocktxn-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    own_work = args.workdir is None
    work: Path = args.workdir or Path(tempfile.mkdtemp(prefix="blocktxn-bench-work-"))
    work.mkdir(parents=True, exist_ok=True)
    quick: bool = args.quick
    runs: list[tuple[str, Callable[[], list[Row]]]] = []
    if "latency" in chosen:
        runs.append(("latency", lambda: latency.run(work / "latency", quick)))
    if "freeze" in chosen:
        runs.append(("freeze", lambda: freeze.run(work / "freeze", quick)))
    data: set[str] = {s for s in ("full", "incremental") if s in chosen}
    if data:
        runs.append((" + ".join(sorted(data)),
                     lambda: datapath.run(work / "data", quick, data)))
    if "libvirt" in chosen:
        runs.append(("libvirt", lambda: hypervisors.run(work / "libvirt", quick)))
    if "scale" in chosen:
        runs.append(("scale", lambda: run_scale(quick)))
    rows: list[Row] = []
    failed: list[str] = []
    started = time.monotonic()
    try:
        for name, section in runs:
            t0 = time.monotonic()
            print(f"bench: {name} ...", flush=True)
            try:
                new = section()
            except Exception:
                traceback.print_exc()
                failed.append(name)
                continue
            rows += new
            print(table(new), flush=True)
            print(f"bench: {name} took {time.monotonic() - t0:.0f} s", flush=True)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    if "incremental" in chosen:
        print("incremental: borg is not installed here: skipped (restic only)")
    order = ["latency", "chain", "freeze", "full", "incremental", "libvirt", "scale"]
    rows.sort(key=lambda r: order.index(r.section) if r.section in order else len(order))
    write_csv(rows, out / "bench.csv")
    plot(rows, out / "bench.png")
    print()
    print(table(rows))
    print(f"\nbench: {'quick ' if quick else ''}run of {', '.join(chosen)} took "
          f"{time.monotonic() - started:.0f} s; {len(rows)} rows")
    if failed:
        print(f"bench: FAILED sections: {', '.join(failed)}")
    print(f"bench: results in {out} (bench.csv, bench.png)")
    return 1 if failed else 0


def stop_on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM/SIGHUP stop the run like Ctrl-C: every lab with it


if __name__ == "__main__":
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop_on_signal)
    sys.exit(main())
