"""What every real-guest backup test asserts of a restored data disk (the checks
themselves are in ``blocktxn.demo.realguest.records``, which the demo narrates)."""

from __future__ import annotations

from pathlib import Path

from blocktxn.demo.realguest.records import RestoredDisk


def assert_point_in_time(path: Path, acknowledged: list[int],
                         after_thaw: list[int]) -> RestoredDisk:
    """The restored raw disk *path* is fsck-clean with no journal recovery needed and holds
    the writer's records 1..N without a gap, N at least the *acknowledged* records (read in
    the guest before the cut), and exactly the start of the guest's log read after the
    thaw (*after_thaw*): nothing written after the thaw."""
    disk = RestoredDisk.read(path)
    assert disk.records, f"{path}: no record restored"
    problems = disk.problems(len(acknowledged), after_thaw)
    assert not problems, f"{path}:\n" + "\n".join(problems)
    return disk
