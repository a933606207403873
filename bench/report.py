"""The benchmark's rows, and what is made of them: the printed table, ``bench.csv`` and
``bench.png``.

A row is one measurement. Absolute times on a shared machine are noise, so a row
that is not itself a floor names the floor it is compared with (``ratio_to``, a
measurement of the same run) and the ratio ``value / floor`` (or, where a row says so
in its metric, the other way round).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes


@dataclass(frozen=True)
class Row:
    section: str
    case: str
    metric: str
    value: float
    unit: str
    ratio_to: str = ""
    ratio: float | None = None


FIELDS = [f.name for f in fields(Row)]


def ratio(value: float, floor: float) -> float:
    """value / floor; a floor of 0 (too fast to measure) counts as a microsecond."""
    return value / floor if floor > 0 else value / 1e-6


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100): a value that was measured."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def write_csv(rows: Iterable[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        for r in rows:
            d = asdict(r)
            d["ratio"] = "" if r.ratio is None else f"{r.ratio:.4g}"
            d["value"] = f"{r.value:.6g}"
            w.writerow(d)


def show(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / (1 << 20):.2f} MiB"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    return f"{value:.4g} {unit}".rstrip()


def table(rows: Sequence[Row]) -> str:
    """One line per row, grouped by section: value, ratio and what the ratio is to."""
    lines: list[str] = []
    width_case = max((len(r.case) for r in rows), default=4)
    width_metric = max((len(r.metric) for r in rows), default=6)
    section = None
    for r in rows:
        if r.section != section:
            section = r.section
            lines.append(f"== {section}")
            lines.append(f"  {'case':<{width_case}}  {'metric':<{width_metric}}  "
                         f"{'value':>12}  {'ratio':>8}  to")
        ratio_text = "" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"  {r.case:<{width_case}}  {r.metric:<{width_metric}}  "
                     f"{show(r.value, r.unit):>12}  {ratio_text:>8}  {r.ratio_to}")
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path) -> None:
    """bench.png: latency against disks (each path and both floors), latency against
    the chain length, and one panel of ratios per other section."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [s for s in dict.fromkeys(r.section for r in rows)
              if s not in ("latency", "chain")]
    panels = 2 + len(others)
    cols = 2 if panels > 1 else 1
    fig, axes = plt.subplots((panels + cols - 1) // cols, cols,
                             figsize=(7 * cols, 4.2 * ((panels + cols - 1) // cols)),
                             squeeze=False)
    flat = list(axes.flat)
    _latency_panel(flat[0], [r for r in rows if r.section == "latency"])
    _chain_panel(flat[1], [r for r in rows if r.section == "chain"])
    for ax, section in zip(flat[2:], others, strict=False):
        _ratio_panel(ax, section, [r for r in rows if r.section == section])
    for ax in flat[panels:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _latency_panel(ax: Axes, rows: list[Row]) -> None:
    ax.set_title("zero-dirty transaction: median latency")
    series: dict[str, list[tuple[int, float]]] = {}
    floors: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        if not r.case.startswith("disks="):
            continue
        first, _, path = r.case.partition(" ")
        disks = int(first.split("=")[1])
        if r.metric == "median" and r.ratio_to == "floor_durable":
            series.setdefault(path, []).append((disks, r.value))
        elif r.metric.startswith("floor_"):
            floors.setdefault(r.metric, {}).setdefault(disks, []).append(r.value)
    for path, points in sorted(series.items()):
        points.sort()
        ax.plot([d for d, _ in points], [v for _, v in points], marker="o", label=path)
    for name, by_disks in sorted(floors.items()):
        ds = sorted(by_disks)
        ax.plot(ds, [median(by_disks[d]) for d in ds], "--", marker="x", label=name)
    ticks = sorted({d for points in series.values() for d, _ in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(d) for d in ticks])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("disks in the transaction")
    ax.set_ylabel("ms")
    if series or floors:
        ax.legend(fontsize=7)


def _chain_panel(ax: Axes, rows: list[Row]) -> None:
    ax.set_title("latency after K earlier incrementals (8 disks, 1 agent)")
    points = sorted((int(r.case.split("=")[1]), r.value) for r in rows
                    if r.metric == "median" and r.ratio_to == "floor_durable"
                    and r.case.startswith("k="))
    floors = sorted((int(r.case.split("=")[1]), r.value) for r in rows
                    if r.metric == "floor_durable" and r.case.startswith("k="))
    if points:
        ax.plot([k for k, _ in points], [v for _, v in points], marker="o",
                label="through the coordinator")
    if floors:
        ax.plot([k for k, _ in floors], [v for _, v in floors], "--", marker="o",
                label="floor_durable")
    ax.set_xlabel("K (earlier incrementals of the same disks)")
    ax.set_ylabel("ms")
    ax.set_ylim(bottom=0)
    if points or floors:
        ax.legend(fontsize=7)


def _ratio_panel(ax: Axes, section: str, rows: list[Row]) -> None:
    shown = [r for r in rows if r.ratio is not None]
    cases = list(dict.fromkeys(r.case for r in shown))
    one_case = len(cases) == 1
    ax.set_title(f"{section}{f' ({cases[0]})' if one_case else ''}: ratios", fontsize=10)
    labels = [f"{'' if one_case else r.case + ' '}{r.metric} / {r.ratio_to}"[:50]
              for r in shown]
    values = [r.ratio for r in shown if r.ratio is not None]
    bars = ax.barh(range(len(values)), values)
    ax.bar_label(bars, [f"{v:.2g}x" for v in values], fontsize=7, padding=2)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.axvline(1.0, color="grey", linewidth=0.8)
    if values and min(values) > 0 and max(values) / min(values) > 50:
        ax.set_xscale("log")
    ax.margins(x=0.15)
    ax.invert_yaxis()
