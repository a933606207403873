"""What a guest's data disk holds, read on the host: the guest writer's records (one
sequence number per line in ``/log``), whether its ext4 is clean (``e2fsck -fn``) and
whether its journal needs recovery; and what a restored disk must satisfy to be the
guest's file system at one point in time inside the freeze (:meth:`RestoredDisk.problems`).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

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
