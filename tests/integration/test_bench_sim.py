"""The SIMULATED scale benchmark (bench/sim.py) in its quick size: simulated agents
against a real etcd and a real coordinator. Behaviour only, never times: every
transaction commits with every disk, every row is a finite number, no simulated agent
is ever seen lost."""

from __future__ import annotations

import math
import shutil

import pytest

from bench.sim import SECTION, run_scale

pytestmark = pytest.mark.integration

AGENTS, DISKS = 10, 3  # the quick size
KINDS = ("full", "incr1")
POSITIVE = ("wall", "decision after last vote", "done after decision", "coordinator RSS",
            "largest etcd value", "final write (record + set)", "final write bound",
            "etcd db size")


def test_quick_simulated_scale_run_commits_every_disk_and_reports_every_row() -> None:
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed: run .ci/run or deploy/setup.sh first")
    rows = run_scale(quick=True)

    got = {(r.case, r.metric): r for r in rows}
    assert {r.section for r in rows} == {SECTION}
    assert {r.case for r in rows} == {f"sim-1x{DISKS}", f"sim-{AGENTS}x{DISKS}"}
    for case, disks in ((f"sim-1x{DISKS}", DISKS), (f"sim-{AGENTS}x{DISKS}", AGENTS * DISKS)):
        assert got[(case, "agents not live (most)")].value == 0
        for kind in KINDS:
            assert got[(case, f"{kind}: transactions")].value == 1
            assert got[(case, f"{kind}: committed disks")].value == disks
            assert got[(case, f"{kind}: starts refused (agent lost)")].value == 0
            for metric in POSITIVE:
                assert got[(case, f"{kind}: {metric}")].value > 0, (case, kind, metric)
    for r in rows:
        assert math.isfinite(r.value) and r.value >= 0, r
        if r.ratio is not None:
            assert math.isfinite(r.ratio) and r.ratio > 0 and r.ratio_to == f"sim-1x{DISKS}", r
    wall = got[(f"sim-{AGENTS}x{DISKS}", "full: wall")]
    assert wall.ratio_to == f"sim-1x{DISKS}" and wall.ratio is not None
