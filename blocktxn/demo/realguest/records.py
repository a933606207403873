"""What a guest's data disk holds, read on the host: the guest writer's records (one
sequence number per line in ``/log``), whether its ext4 is clean (``e2fsck -fn``) and
whether its journal needs recovery; and what a restored disk must satisfy to be the
guest's file system at one point in time inside the freeze (:meth:`RestoredDisk.problems`).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blocktxn.demo.realguest.image import GUEST_LOG, tool
from blocktxn.demo.realguest.qga import GuestAgent


def numbers(data: bytes) -> list[int]:
    """The writer's sequence numbers (an unfinished last line is left out)."""
    complete = data[:data.rfind(b"\n") + 1]
    return [int(x) for x in complete.split()]


def disk_log(image: Path) -> bytes:
    """``/log`` as the raw ext4 image *image* holds it, read on the host (read-only)."""
    proc = subprocess.run([tool("debugfs"), "-R", "cat /log", str(image)],
                          capture_output=True, check=True)
    if b"not found" in proc.stderr:
        raise FileNotFoundError(f"/log in {image}: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def needs_recovery(image: Path) -> bool:
    """Whether the superblock on disk says the journal needs recovery (ext4 mounted and
    not frozen: FIFREEZE checkpoints the journal and clears the flag)."""
    out = subprocess.run([tool("dumpe2fs"), "-h", str(image)], capture_output=True,
                         text=True, check=True).stdout
    features = [line for line in out.splitlines() if line.startswith("Filesystem features:")]
    if len(features) != 1:
        raise ValueError(f"dumpe2fs -h {image}: no single feature line:\n{out}")
    return "needs_recovery" in features[0].split()


def fsck(image: Path) -> subprocess.CompletedProcess[str]:
    """``e2fsck -fn``: a forced check that changes nothing (it answers "no" to any fix)."""
    return subprocess.run([tool("e2fsck"), "-fn", str(image)],
                          capture_output=True, text=True, check=False)


@dataclass(frozen=True)
class RestoredDisk:
    """A restored raw data disk as the host reads it."""

    path: Path
    records: list[int]
    fsck_status: int
    fsck_output: str
    needs_recovery: bool

    @classmethod
    def read(cls, path: Path) -> RestoredDisk:
        checked = fsck(path)
        return cls(path, numbers(disk_log(path)), checked.returncode,
                   checked.stdout + checked.stderr, needs_recovery(path))

    def problems(self, acknowledged: int, after_thaw: list[int]) -> list[str]:
        """Why this is not the guest's file system frozen between the cut and the thaw;
        empty when it is.

        *acknowledged*: how many records the guest had written (read in the guest)
        before the cut was asked for; *after_thaw*: the guest's own log, read after the
        thaw. The restore must be clean with nothing to fix, need no journal recovery
        (the freeze checkpointed it), hold records 1..N without a gap, N at least
        *acknowledged*, and be exactly the start of *after_thaw* (so no record written
        after the thaw, and none that the guest does not have).
        """
        n = len(self.records)
        found = []
        if self.fsck_status != 0 or "Fix?" in self.fsck_output:
            found.append(f"e2fsck -fn exited {self.fsck_status}:\n{self.fsck_output}")
        if self.needs_recovery:
            found.append("its journal needs recovery: not a frozen file system")
        if self.records != list(range(1, n + 1)):
            found.append(f"its records are not 1..{n} without a gap: {self.records[:20]}...")
        if n < acknowledged:
            found.append(f"{n} records, fewer than the {acknowledged} acknowledged before "
                         "the cut")
        if n > len(after_thaw):
            found.append(f"{n} records, more than the {len(after_thaw)} the guest had "
                         "after the thaw")
        elif after_thaw[:n] != self.records:
            found.append("its records differ from the start of the guest's own log")
        return found


def guest_log(agent_socket: Path, timeout: float = 60.0) -> list[int]:
    """The writer's records as the guest sees them, read through its qemu-ga on a
    connection of its own, closed before returning: the socket serves one client at a
    time, and a blocktxn agent opens its own for each freeze and thaw."""
    ga = GuestAgent(agent_socket, timeout)
    try:
        ga.sync(timeout)
        return numbers(ga.read_file(GUEST_LOG))
    finally:
        ga.close()


@dataclass(frozen=True)
class FreezeWindow:
    """One agent's freeze of a transaction, as its journal records it: the freeze began
    at *frozen_at* and was done by *cut_at* (the jobs started inside it); the guests were
    thawed by *thawed_at*, on the coordinator's Thaw unless *on_own* (its deadline)."""

    frozen_at: float
    cut_at: float
    thawed_at: float
    on_own: bool


def freeze_window(repo: Path, txn_id: str) -> FreezeWindow:
    """*txn_id*'s freeze in the journal of the agent whose repository is *repo*.

    Raises:
        KeyError: the journal has no cut or no thaw of it.
    """
    cut: dict[str, Any] = {}
    thawed: dict[str, Any] = {}
    for line in (repo / "journal.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a torn last line
            continue
        if rec.get("txn") == txn_id and rec.get("type") == "CutDone":
            cut = rec["data"]
        elif rec.get("txn") == txn_id and rec.get("type") == "Thawed":
            thawed = rec["data"]
    if not cut or not thawed:
        raise KeyError(f"no cut and thaw of {txn_id} in {repo / 'journal.jsonl'}")
    return FreezeWindow(float(cut["frozen_at"]), float(cut["cut_at"]),
                        float(thawed["at"]), bool(thawed["on_own"]))


def overlap_problems(windows: dict[str, FreezeWindow], cut_done_at: float) -> list[str]:
    """Why the agents' freezes (host -> window) do not make one cut, empty when they do:
    every freeze began and was done (cut_at) before the coordinator saw the whole cut
    done (*cut_done_at*), and every thaw came after that, on the coordinator's Thaw."""
    found = [f"{h} thawed on its own (deadline)" for h, w in windows.items() if w.on_own]
    found += [f"{h}: frozen_at {w.frozen_at:.3f} after its cut_at {w.cut_at:.3f}"
              for h, w in windows.items() if not w.frozen_at or w.frozen_at > w.cut_at]
    last_frozen = max(w.cut_at for w in windows.values())
    first_thaw = min(w.thawed_at for w in windows.values())
    if not last_frozen <= cut_done_at < first_thaw:
        found.append(f"the last freeze was done at {last_frozen:.3f}, the cut seen done at "
                     f"{cut_done_at:.3f}, the first thaw at {first_thaw:.3f}: not in order")
    return found
