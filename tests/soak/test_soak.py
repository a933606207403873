"""The soak run, short (~3 minutes), as part of the normal suite: the same code as
``python -m tests.soak`` with 60 transactions of one simulated day each (so the
daily and weekly rules of keep-last=5,keep-daily=7,keep-weekly=4 reach their steady
state after 28), ~10% faults, a sample every 15.

What it asserts: everything the long run checks except the plateau verdicts (60
transactions are too few samples per third to call a plateau: they are printed,
``--plateau report``): every committed transaction's expected outcome, bounded
freeze, retention (a fixed point of the policy, nothing it keeps removed), every
removed set gone everywhere, nothing left over in QEMU or the repositories, every
sampled and every finally kept set restoring equal to its cut and verifying; and
the bound the policy puts on each agent's repository: catalog rows <= 17 sets x 4
disks, bytes <= 17 x 4 x (disk + 1 MiB) + 4 MiB.
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.soak, pytest.mark.integration]


def test_short_soak_keeps_every_invariant_and_stays_within_the_policy(tmp_path: Path
                                                                      ) -> None:
    for binary in ("qemu-storage-daemon", "qemu-img", "qemu-io", "etcd"):
        if shutil.which(binary) is None:
            pytest.fail(f"{binary} is not installed: run .ci/run or deploy/setup.sh first")
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "tests.soak", "--transactions", "60", "--every", "15",
         "--hours", "24", "--fault-rate", "0.1", "--seed", "5", "--plateau", "report",
         "--out", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=900)
    text = res.stdout
    assert res.returncode == 0, text[-6000:] + res.stderr[-3000:]
    assert "soak: PASS" in text and "failures: 0" in text
    assert "bounds from the policy (<= 16 sets): ok" in text
    m = re.search(r"(\d+) transactions \((\d+) committed, (\d+) aborted\)", text)
    assert m is not None, text[-3000:]
    total, committed, _ = map(int, m.groups())
    assert total == 60 and committed >= 45
    faults = re.search(r"faults injected: (.*) \((\d+) of", text)
    assert faults is not None and int(faults.group(2)) >= 3, text[-3000:]
    m = re.search(r"restored and compared with the cut: (\d+) disks of (\d+) sets", text)
    assert m is not None and int(m.group(2)) >= 8, text[-3000:]
    m = re.search(r"removed sets checked gone everywhere: (\d+)", text)
    assert m is not None and int(m.group(1)) >= 30  # 60 days: most sets were pruned
    rows = list(csv.DictReader(open(out / "soak.csv")))
    assert [int(r["txns"]) for r in rows] == [15, 30, 45, 60]
    assert all(int(r["catalog_rows_h1"]) <= 17 * 4 for r in rows)
    assert (out / "soak.png").stat().st_size > 10_000
    # nothing of the run is left running (its daemons are children of the run)
    assert str(tmp_path) not in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                               text=True).stdout
