"""The benchmark suite's quick run (``python -m bench --quick``, about 2 minutes): its
behaviour, never its times. Every section and case has its rows, every ratio is a
positive finite number against a named floor, the plot is written, restic's
repository grew, and an incremental of 1% of a disk is much smaller than the disk."""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench import latency
from bench.datapath import disk_size

pytestmark = pytest.mark.integration


def test_quick_bench_reports_every_section_against_its_floors(tmp_path: Path) -> None:
    for binary in ("qemu-storage-daemon", "qemu-img", "qemu-io", "etcd", "restic"):
        if shutil.which(binary) is None:
            pytest.fail(f"{binary} is not installed: run deploy/setup.sh first")
    out = tmp_path / "out"
    # the labs' sockets need short paths (a unix socket path has at most 107 bytes)
    work = Path(tempfile.mkdtemp(prefix="btxb-"))
    try:
        run = subprocess.Popen([sys.executable, "-m", "bench", "--quick", "--out", str(out),
                                "--workdir", str(work)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            text, errors = run.communicate(timeout=1200)
        except subprocess.TimeoutExpired:
            run.terminate()  # the run stops every lab it started, then exits
            text, errors = run.communicate(timeout=120)
            pytest.fail(f"the quick run took more than 20 minutes:\n{text[-6000:]}")
        left = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert run.returncode == 0, text[-6000:] + errors[-4000:]
    assert str(work) not in left  # nothing of the run is left running
    assert "borg is not installed here: skipped" in text
    assert f"results in {out}" in text

    rows = list(csv.DictReader(open(out / "bench.csv")))
    assert list(rows[0]) == ["section", "case", "metric", "value", "unit", "ratio_to",
                             "ratio"]
    for r in rows:
        assert math.isfinite(float(r["value"])), r
        if r["ratio_to"]:
            assert r["ratio"], r
            assert math.isfinite(float(r["ratio"])) and float(r["ratio"]) > 0, r
        else:
            assert not r["ratio"], r
    found = {(r["section"], r["case"], r["metric"], r["ratio_to"]) for r in rows}

    plan = latency.plan(quick=True)
    cases = [f"disks={n} agent" for n in plan.disks]
    cases += [f"disks={n} coordinator, {a} agent{'s' if a > 1 else ''}"
              for a in plan.agents for n in plan.disks if n >= a]
    for case in cases:
        for floor in ("floor_grouped", "floor_durable"):
            assert ("latency", case, floor, "") in found, case
            assert ("latency", case, "median", floor) in found, case
    for metric, floor in (("bare_qemu", ""), ("floor_libvirt", ""),
                          ("libvirt", "bare_qemu"), ("libvirt", "floor_libvirt")):
        assert ("libvirt", "disks=2 agent", metric, floor) in found
    for k in plan.chain:
        assert ("chain", f"k={k}", "median", "floor_durable") in found
    assert ("chain", f"k={plan.chain[-1]}", "median", f"k={plan.chain[0]}") in found

    def value(section: str, metric: str, ratio_to: str = "") -> float:
        match = [r for r in rows if r["section"] == section and r["metric"] == metric
                 and (not ratio_to or r["ratio_to"] == ratio_to)]
        assert len(match) == 1, (section, metric, match)
        return float(match[0]["value"])

    assert value("freeze", "transactions") == 10
    for name in ("p50", "p99", "max"):
        assert value("freeze", name, f"floor_{name}") > 0
    assert value("freeze", "p50") <= value("freeze", "p99") <= value("freeze", "max")

    for metric, floor in (("blocktxn", "floor_qemu_img_convert"),
                          ("cp", "floor_qemu_img_convert"),
                          ("blocktxn_rate", "floor_qemu_img_convert_rate"),
                          ("cp_rate", "floor_qemu_img_convert_rate")):
        assert value("full", metric, floor) > 0
    assert value("incremental", "restic", "blocktxn") > 0
    changed = value("incremental", "changed")
    assert changed == pytest.approx(disk_size(quick=True) / 100, rel=0.05)
    assert value("incremental", "restic_growth") > 0
    # 1% changed: the incremental image holds about that, plus qcow2 metadata
    assert changed <= value("incremental", "blocktxn_growth") < disk_size(quick=True) / 10

    assert (out / "bench.png").stat().st_size > 10_000
