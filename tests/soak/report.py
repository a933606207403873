"""The soak's curves: the plateau rule, the CSV, the PNG and the table.

The plateau rule (stated in every summary): split the samples by transaction count
into thirds; the middle third is the samples with N/3 < n <= 2N/3, the last third
those with n > 2N/3. A cost curve (bytes, rows, keys, memory, descriptors) PLATEAUS if
both

    median(last third) <= median(middle third) * (1 + TREND) + slack
    max(last third)    <= max(middle third) * (1 + SPIKE) + slack

with TREND = 5%, SPIKE = 10% and a small absolute slack per curve for noise (listed
with each curve). The median rule catches a steady trend: a leak of +20% per third
(seen in the first full run: a long-lived agent's RSS, 85 -> 104 MiB) passed a
max-only rule with 10% + 16 MiB of slack. Throughput plateaus if the median of the
last third is at least (1 - SLOWDOWN) = 70% of the median of the middle third (the
machine is shared). Each third needs at least MIN_POINTS samples, otherwise the
verdict is "too short".
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

TREND = 0.05
SPIKE = 0.10
SLOWDOWN = 0.30
MIN_POINTS = 3
MiB = 1 << 20
RULE = (f"plateau: median over the last third of the run <= median over the middle third "
        f"x {1 + TREND:.2f} + slack, and max over the last third <= max over the middle "
        f"third x {1 + SPIKE:.2f} + slack (slack per curve); throughput: median of the last "
        f"third >= {1 - SLOWDOWN:.2f} x median of the middle third; >= {MIN_POINTS} samples "
        f"per third")


@dataclass(frozen=True)
class Curve:
    column: str       # CSV column
    label: str        # what it is, for the table and the plot
    unit: str         # "bytes", "KiB", "count", "txn/s"
    slack: float      # absolute slack, in the column's unit
    panel: str        # which plot it goes on


@dataclass(frozen=True)
class Verdict:
    curve: Curve
    start: float
    end: float
    mid: float        # median over the middle third
    last: float
    ok: bool | None   # None: too few samples to judge
    note: str


def curves(agents: list[str]) -> list[Curve]:
    nodes = "descriptors, leftover nodes"
    out = [Curve(f"repo_bytes_{a}", f"repository bytes {a}", "bytes", 4 * MiB,
                 "repository (MiB)") for a in agents]
    out += [Curve(f"catalog_rows_{a}", f"catalog rows {a}", "count", 4, "catalog rows")
            for a in agents]
    out += [Curve("etcd_db_bytes", "etcd db size", "bytes", 1 * MiB, "etcd database (MiB)"),
            # the collector runs once a minute: the count swings by a minute of records
            # (txn + decision + request keys at ~1 txn/s)
            Curve("etcd_keys", "etcd keys /blocktxn/", "count", 180, "etcd keys"),
            Curve("coordinator_rss_kib", "coordinator RSS", "KiB", 4 * 1024, "RSS (MiB)")]
    out += [Curve(f"agent_rss_kib_{a}", f"agent RSS {a}", "KiB", 4 * 1024, "RSS (MiB)")
            for a in agents]
    out += [Curve("etcd_rss_kib", "etcd RSS", "KiB", 4 * 1024, "RSS (MiB)"),
            Curve("qemu_rss_kib_max", "QEMU RSS (largest VM)", "KiB", 4 * 1024, "RSS (MiB)"),
            Curve("qemu_leftover_nodes", "QEMU btx nodes left", "count", 0, nodes),
            Curve("coordinator_fds", "coordinator fds", "count", 4, nodes)]
    out += [Curve(f"agent_fds_{a}", f"agent fds {a}", "count", 4, nodes) for a in agents]
    out += [Curve("prune_backlog_sets", "sets awaiting removal", "count", 4, "catalog rows"),
            Curve("prune_wait_s_mean", "prune after a commit (mean)", "s", 0.5,
                  "throughput (txn/s), prune (s)"),
            Curve("txns_per_s", "throughput", "txn/s", 0, "throughput (txn/s), prune (s)")]
    return out


def judge(curve: Curve, rows: list[dict[str, float]]) -> Verdict:
    points = [(r["txns"], r[curve.column]) for r in rows if curve.column in r]
    total = max((n for n, _ in points), default=0)
    mid = [v for n, v in points if total / 3 < n <= 2 * total / 3]
    last = [v for n, v in points if n > 2 * total / 3]
    start = points[0][1] if points else 0.0
    end = points[-1][1] if points else 0.0
    if len(mid) < MIN_POINTS or len(last) < MIN_POINTS:
        return Verdict(curve, start, end, statistics.median(mid) if mid else 0.0,
                       statistics.median(last) if last else 0.0, None,
                       f"too short: {len(mid)}/{len(last)} samples in the middle/last third")
    if curve.unit == "txn/s":
        m, lt = statistics.median(mid), statistics.median(last)
        ok = lt >= (1 - SLOWDOWN) * m
        return Verdict(curve, start, end, m, lt, ok,
                       f"median last {lt:.2f} vs {(1 - SLOWDOWN) * m:.2f} floor")
    med_m, med_l = statistics.median(mid), statistics.median(last)
    max_m, max_l = max(mid), max(last)
    trend = med_m * (1 + TREND) + curve.slack
    spike = max_m * (1 + SPIKE) + curve.slack
    u = curve.unit
    return Verdict(curve, start, end, med_m, med_l, med_l <= trend and max_l <= spike,
                   f"median bound {show(trend, u)}; max {show(max_m, u)} -> {show(max_l, u)}"
                   f", bound {show(spike, u)}; slack {show(curve.slack, u)}")


def show(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / MiB:.1f}MiB"
    if unit == "KiB":
        return f"{value / 1024:.1f}MiB"
    if unit in ("txn/s", "s"):
        return f"{value:.2f}"
    return f"{value:.0f}"


def table(verdicts: list[Verdict]) -> str:
    lines = [f"{'curve (medians of thirds)':28} {'start':>10} {'end':>10} {'mid':>10} "
             f"{'last':>10}  verdict"]
    for v in verdicts:
        word = {True: "PLATEAU", False: "GROWS", None: "n/a"}[v.ok]
        u = v.curve.unit
        lines.append(f"{v.curve.label:28} {show(v.start, u):>10} {show(v.end, u):>10} "
                     f"{show(v.mid, u):>10} {show(v.last, u):>10}  {word} ({v.note})")
    return "\n".join(lines)


def read_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def write_csv(path: Path, rows: list[dict[str, float]]) -> None:
    if not rows:
        return
    columns = list(rows[0])
    for r in rows[1:]:
        columns += [c for c in r if c not in columns]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def plot(path: Path, rows: list[dict[str, float]], verdicts: list[Verdict],
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[Verdict]] = {}
    for v in verdicts:
        panels.setdefault(v.curve.panel, []).append(v)
    extra = {"etcd database (MiB)": [("etcd_db_in_use_bytes", "etcd db in use")],
             "repository (MiB)": [("etcd_dir_bytes", "etcd data dir")],
             "etcd keys": [("etcd_keys_txn", "txn records")],
             "throughput (txn/s), prune (s)": [("prune_wait_s_max", "prune max (s)")]}
    ncols = 3
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.6 * nrows), squeeze=False)
    total = max((r["txns"] for r in rows), default=0)
    for ax, (panel, members) in zip(axes.flat, panels.items(), strict=False):
        for v in members:
            xs = [r["txns"] for r in rows if v.curve.column in r]
            ys = [scale(r[v.curve.column], v.curve.unit) for r in rows if v.curve.column in r]
            word = {True: "plateau", False: "GROWS", None: "n/a"}[v.ok]
            ax.plot(xs, ys, marker=".", label=f"{v.curve.label} [{word}]")
        for column, label in extra.get(panel, []):
            xs = [r["txns"] for r in rows if column in r]
            ys = [scale(r[column], "bytes" if column.endswith("bytes") else "count")
                  for r in rows if column in r]
            ax.plot(xs, ys, linestyle="--", label=f"{label} (info)")
        for x in (total / 3, 2 * total / 3):
            ax.axvline(x, color="grey", linewidth=0.5, linestyle=":")
        ax.set_title(panel)
        ax.set_xlabel("transactions")
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1] * 1.08))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def scale(value: float, unit: str) -> float:
    if unit == "bytes":
        return value / MiB
    if unit == "KiB":
        return value / 1024
    return value
