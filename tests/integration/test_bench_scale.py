"""The scale run of REAL processes (bench/scale.py) in its quick size: 10 agent
processes, each with a qemu-storage-daemon VM of 3 disks, one coordinator, one etcd.
Behaviour only, never times: every transaction commits every disk in the mode asked
for, no agent is ever seen lost, idle heartbeats write nothing to etcd, and no process
logs an ERROR or a traceback."""

from __future__ import annotations

import asyncio
import math
import shutil

import pytest

from bench.scale import SECTION, scale

pytestmark = pytest.mark.integration

HOSTS, DISKS = 10, 3


def test_quick_scale_run_of_real_processes_commits_every_disk_with_clean_logs() -> None:
    for tool in ("etcd", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run .ci/run or deploy/setup.sh first")
    run = asyncio.run(scale(HOSTS, DISKS, 1, 10.0))

    rows = run.result.rows
    got = {(r.case, r.metric): r for r in rows}
    notes = "\n".join(run.result.notes)  # what the run saw: failures end a case early
    missing = [(case, f"{kind}: {m}") for case in (f"1x{DISKS}", f"{HOSTS}x{DISKS}")
               for kind in ("full", "incr1") for m in ("transactions", "committed disks")
               if (case, f"{kind}: {m}") not in got]
    assert missing == [], notes
    assert {r.section for r in rows} == {SECTION}
    for case, disks in ((f"1x{DISKS}", DISKS), (f"{HOSTS}x{DISKS}", HOSTS * DISKS)):
        assert got[(case, "agents not live (most)")].value == 0
        assert got[(case, "idle: etcd revisions")].value == 0, run.result.notes
        for kind in ("full", "incr1"):
            assert got[(case, f"{kind}: transactions")].value == 1
            assert got[(case, f"{kind}: committed disks")].value == disks
            assert got[(case, f"{kind}: starts refused (agent lost)")].value == 0
            assert got[(case, f"{kind}: agents CPU")].value > 0
    for r in rows:
        assert math.isfinite(r.value) and r.value >= 0, r
    bad = [ln for ln in run.warnings if " ERROR " in ln or "Traceback" in ln]
    assert bad == []
    assert any(t > 0 and n == HOSTS for t, n in run.result.live)
