"""Sections ``full`` and ``incremental``: the data path, on one VM with one disk of
random data (2 GiB; quick: 64 MiB), quiesce none, through the agent alone (``Host``:
Cut, Thaw, Prepare, Commit).

``full``: a full backup against copying the same image with ``qemu-img convert -O
qcow2`` (the floor) and with ``cp``, each made durable (fsync of the copy and of its
directory, as the agent does; not a machine-wide sync, which would also flush the
other work on this machine).

``incremental``: after that full, 1% of the disk is rewritten with random data in
scattered 64 KiB writes through the VM (``qemu-io`` on its NBD export, as the test
workloads write); then an incremental through the agent against ``restic backup`` of
the same raw image with the same change applied (restic re-reads and re-chunks the
whole image). Both: time and how much the repository grew per changed byte.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blocktxn.agent.checksums import file_sha256
from blocktxn.agent.jsonl import fsync_dir, fsync_file
from blocktxn.demo.lab import CLUSTER
from blocktxn.v1 import agent_pb2 as apb
from tests.integration.harness import Host, iter_files

from .report import Row, median, ratio

MiB = 1 << 20
TOOL_TIMEOUT = 1800.0
CHANGED = 0.01  # share of the disk rewritten before the incremental


def disk_size(quick: bool) -> int:
    return 64 * MiB if quick else 2048 * MiB


def tool(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
         ) -> str:
    """Run a tool to its end (killed past TOOL_TIMEOUT); its stdout."""
    res = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, env=env,
                         cwd=cwd)
    if res.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return res.stdout


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(4 * MiB, left)
            f.write(os.urandom(n))
            left -= n


def durable_copy(argv: list[str], out: Path) -> float:
    """Seconds: *argv* writes *out*, then *out* and its directory are fsynced."""
    t0 = time.perf_counter()
    tool(argv)
    fsync_file(out)
    fsync_dir(out.parent)
    return time.perf_counter() - t0


@dataclass
class AgentBackup:
    seconds: float
    phases: dict[str, float]
    image: Path


def agent_backup(host: Host, txn: str, mode: apb.BackupMode.ValueType) -> AgentBackup:
    """Cut, Thaw, Prepare, Commit of disk big/d0, each timed."""
    member = [("big", "d0")]
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    host.cut(txn, member, mode=mode, quiesce=apb.QUIESCE_NONE)
    t["cut"] = time.perf_counter()
    host.thaw(txn)
    t["thaw"] = time.perf_counter()
    vote = host.prepare(txn)
    t["prepare"] = time.perf_counter()
    if not vote.yes:
        raise RuntimeError(f"{txn}: the agent voted NO: {vote.reason}")
    host.commit(txn)
    t["commit"] = time.perf_counter()
    phases, last = {}, t0
    for name, at in t.items():
        phases[name] = at - last
        last = at
    return AgentBackup(t["commit"] - t0, phases, host.image(vote.images[0].image))


def qemu_io_writes(offsets: list[int], chunks: Path) -> list[str]:
    """qemu-io commands: each offset gets its own 64 KiB of random data."""
    args: list[str] = []
    for i, off in enumerate(offsets):
        args += ["-c", f"write -q -s {chunks / f'{i}.bin'} {off} {CLUSTER}"]
    return args


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in iter_files(root))


class Restic:
    def __init__(self, work: Path) -> None:
        self.repo = work / "restic-repo"
        self.env = {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": str(self.repo),
                    "RESTIC_CACHE_DIR": str(work / "restic-cache")}
        tool(["restic", "init", "-q"], self.env)

    def backup(self, path: Path) -> tuple[float, dict[str, Any]]:
        """Seconds, and restic's summary."""
        t0 = time.perf_counter()
        out = tool(["restic", "backup", "--json", "--host", "bench", path.name], self.env,
                   cwd=path.parent)
        elapsed = time.perf_counter() - t0
        summary: dict[str, Any] = {}
        for line in out.splitlines():
            if line.startswith("{") and '"summary"' in line:
                summary = json.loads(line)
        return elapsed, summary


def run(work: Path, quick: bool, sections: set[str]) -> list[Row]:
    """Sections full and/or incremental (an incremental needs the full before it)."""
    size = disk_size(quick)
    reps = 3 if quick else 1
    work.mkdir(parents=True, exist_ok=True)
    source = work / "source.raw"
    write_random(source, size)
    host = Host(work / "host", {"big": ["d0"]}, agent_id="data", disk_size=size)
    rows: list[Row] = []
    try:
        host.start_agent()
        vm = host.vms["big"]
        # the random content reaches the VM's disk through its NBD export, as a guest's
        tool(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source),
              vm.nbd_uri("d0")])
        full_rows, full = _full(work, host, reps, size, "full" in sections)
        rows += full_rows
        if "incremental" in sections:
            rows += _incremental(work, host, source, size, full)
    finally:
        host.close()
    return rows


def _full(work: Path, host: Host, reps: int, size: int, compare: bool
          ) -> tuple[list[Row], AgentBackup]:
    disk = host.vms["big"].disks[0].image
    out = work / "copies"
    out.mkdir(exist_ok=True)
    ours: list[AgentBackup] = []
    convert: list[float] = []
    cp: list[float] = []
    for i in range(reps if compare else 1):
        ours.append(agent_backup(host, f"full-{i}", apb.BACKUP_MODE_FULL))
        if not compare:
            break
        target = out / "convert.qcow2"
        convert.append(durable_copy(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2",
                                     str(disk), str(target)], target))
        target.unlink()
        target = out / "cp.qcow2"
        cp.append(durable_copy(["cp", str(disk), str(target)], target))
        target.unlink()
    if not compare:
        return [], ours[-1]
    case = f"{size // MiB} MiB random"
    b, c, p = median([a.seconds for a in ours]), median(convert), median(cp)
    mbs = size / 1e6
    rows = [Row("full", case, "floor_qemu_img_convert", c, "s"),
            Row("full", case, "blocktxn", b, "s", "floor_qemu_img_convert", ratio(b, c)),
            Row("full", case, "cp", p, "s", "floor_qemu_img_convert", ratio(p, c)),
            Row("full", case, "floor_qemu_img_convert_rate", mbs / c, "MB/s"),
            Row("full", case, "blocktxn_rate", mbs / b, "MB/s", "floor_qemu_img_convert_rate",
                ratio(mbs / b, mbs / c)),
            Row("full", case, "cp_rate", mbs / p, "MB/s", "floor_qemu_img_convert_rate",
                ratio(mbs / p, mbs / c))]
    for phase in ("cut", "thaw", "prepare", "commit"):
        v = median([a.phases[phase] for a in ours])
        rows.append(Row("full", case, f"blocktxn_{phase}", v, "s", "blocktxn", ratio(v, b)))
    # the part of Prepare that reads the image: its checksum (the agent's own function)
    t0 = time.perf_counter()
    asyncio.run(file_sha256(ours[-1].image))
    sha = time.perf_counter() - t0
    rows.append(Row("full", case, "sha256_of_image", sha, "s", "blocktxn_prepare",
                    ratio(sha, median([a.phases["prepare"] for a in ours]))))
    return rows, ours[-1]


def _incremental(work: Path, host: Host, source: Path, size: int, full: AgentBackup
                 ) -> list[Row]:
    rng = random.Random(11)
    count = max(1, int(size * CHANGED) // CLUSTER)
    offsets = sorted(c * CLUSTER for c in rng.sample(range(size // CLUSTER), count))
    chunks = work / "chunks"
    chunks.mkdir(exist_ok=True)
    for i in range(count):
        (chunks / f"{i}.bin").write_bytes(rng.randbytes(CLUSTER))
    changed = count * CLUSTER
    restic = Restic(work)
    first, _ = restic.backup(source)
    before = tree_bytes(restic.repo)
    # the same change, to the VM (through its NBD export) and to the raw image
    writes = qemu_io_writes(offsets, chunks)
    tool(["qemu-io", "-f", "raw", *writes, host.vms["big"].nbd_uri("d0")])
    tool(["qemu-io", "-f", "raw", *writes, str(source)])
    ours = agent_backup(host, "incr-0", apb.BACKUP_MODE_INCREMENTAL)
    ours_growth = ours.image.stat().st_size
    second, summary = restic.backup(source)
    growth = tree_bytes(restic.repo) - before
    shutil.rmtree(chunks)
    if summary.get("files_changed") != 1:
        raise RuntimeError(f"restic did not see the changed image: {summary}")
    case = f"{CHANGED:.0%} of {size // MiB} MiB in 64 KiB writes"
    return [
        Row("incremental", case, "changed", changed, "bytes"),
        Row("incremental", case, "blocktxn", ours.seconds, "s", "blocktxn full",
            ratio(ours.seconds, full.seconds)),
        Row("incremental", case, "restic", second, "s", "blocktxn",
            ratio(second, ours.seconds)),
        Row("incremental", case, "restic_first_backup", first, "s", "blocktxn full",
            ratio(first, full.seconds)),
        Row("incremental", case, "blocktxn_growth", ours_growth, "bytes", "changed",
            ratio(ours_growth, changed)),
        Row("incremental", case, "restic_growth", growth, "bytes", "changed",
            ratio(growth, changed)),
        Row("incremental", case, "restic_data_added", float(summary.get("data_added", 0)),
            "bytes", "changed", ratio(float(summary.get("data_added", 0)), changed)),
    ]
