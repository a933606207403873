"""``blocktxn demo --real-guests`` runs its whole story on two booted guests and passes
every check, and leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from blocktxn.demo.realguest.image import GuestImage

pytestmark = pytest.mark.integration


def processes_naming(path: Path) -> list[str]:
    """Command lines of live processes that name *path* (the demo's QEMUs, agents...)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def test_the_real_guest_demo_passes_every_check(guest_image: GuestImage,
                                                tmp_path: Path) -> None:
    work = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "blocktxn", "demo", "--real-guests",
                           "--workdir", str(work)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "COLUMNS": "200"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "FAIL" not in out and "demo passed" in out, out
    assert "checks passed: 11/11" in out, out
    for step in ("full backup committed on both hosts",
                 "incremental committed on both hosts, as incrementals",
                 "cancelled transaction aborted on every host",
                 "every disk kept its checkpoint",
                 "retried incremental committed",
                 "h1/web/data: clean ext4", "h2/db/data: clean ext4", "verify:"):
        assert f"PASS {step}" in out, out
    assert out.count("PASS every guest was frozen before any was thawed") == 3, out
    assert not processes_naming(work)
