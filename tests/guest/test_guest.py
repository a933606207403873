"""A real guest file system freeze: qemu-guest-agent's fsfreeze in a booted Linux guest.

How "no progress while frozen" is observed: the guest agent refuses guest-file-* and
guest-exec while the guest is frozen, so the guest cannot be asked. The host reads the
data disk instead, with ``debugfs`` on the raw image QEMU is running on (the host page
cache QEMU writes through is coherent with what we read). Outside a freeze that view is
not trustworthy (metadata still in the guest's journal or page cache), but a freeze
flushes everything and keeps it so: two reads of ``/log`` some time apart while frozen
must be equal and hold every line the guest had written before the freeze. The
superblock shows it is ext4's own freeze: a mounted ext4 keeps ``needs_recovery`` set on
disk; FIFREEZE checkpoints the journal and clears it (then ``e2fsck -fn`` finds nothing
at all to fix), the thaw sets it again. After the thaw the guest itself
(guest-file-read) must show the writer continuing from the next number: the file then
starts with exactly the frozen content.
"""

from __future__ import annotations

import time

import pytest

from blocktxn.demo.realguest.image import GUEST_LOG
from blocktxn.demo.realguest.qga import GuestAgent
from blocktxn.demo.realguest.records import disk_log, fsck, needs_recovery, numbers
from blocktxn.demo.realguest.vm import GuestVm

pytestmark = pytest.mark.integration

PROGRESS_TIMEOUT = 60.0  # generous: TCG on a shared, busy machine


def _guest_log(ga: GuestAgent) -> list[int]:
    return numbers(ga.read_file(GUEST_LOG))


def _wait_for_lines(ga: GuestAgent, count: int) -> list[int]:
    """Read the log through the guest agent until it holds at least *count* lines."""
    deadline = time.monotonic() + PROGRESS_TIMEOUT
    while True:
        lines = _guest_log(ga)
        if len(lines) >= count:
            return lines
        assert time.monotonic() < deadline, f"the writer stopped at {len(lines)} lines"
        time.sleep(0.1)


def test_fsfreeze_stops_the_writer_on_disk_and_thaw_resumes_it(
        guest_vm: GuestVm, guest_agent: GuestAgent) -> None:
    ga = guest_agent
    assert ga.execute("guest-fsfreeze-status") == "thawed"

    # The writer runs: the log grows while we watch (and how long 10 lines take sets
    # how long we watch the frozen disk: several such periods).
    start = len(_wait_for_lines(ga, 1))
    t0 = time.monotonic()
    before = _wait_for_lines(ga, start + 10)
    ten_lines = time.monotonic() - t0
    assert before == list(range(1, len(before) + 1))
    assert needs_recovery(guest_vm.data_disk), "the mounted ext4 should need recovery"

    frozen = ga.execute("guest-fsfreeze-freeze", timeout=60)
    thawed: int | None = None
    try:
        assert isinstance(frozen, int) and frozen >= 1, frozen  # /data, at least
        assert ga.execute("guest-fsfreeze-status") == "frozen"

        first = disk_log(guest_vm.data_disk)
        time.sleep(max(1.0, 3 * ten_lines))
        second = disk_log(guest_vm.data_disk)
        frozen_needs_recovery = needs_recovery(guest_vm.data_disk)
        checked = fsck(guest_vm.data_disk)
        assert ga.execute("guest-fsfreeze-status") == "frozen"
    finally:
        thawed = ga.execute("guest-fsfreeze-thaw", timeout=60)

    on_disk = numbers(first)
    assert first == second, "the writer's file changed on disk while frozen"
    assert first.endswith(b"\n"), "a torn line on the frozen disk"
    assert on_disk == list(range(1, len(on_disk) + 1)), "the frozen file is not 1..N"
    assert len(on_disk) >= len(before), "the frozen disk lacks lines written before"
    assert not frozen_needs_recovery, "the frozen ext4's journal was not checkpointed"
    assert checked.returncode == 0 and "Fix?" not in checked.stdout, \
        f"frozen file system not clean:\n{checked.stdout}{checked.stderr}"

    assert thawed == frozen
    assert ga.execute("guest-fsfreeze-status") == "thawed"
    assert needs_recovery(guest_vm.data_disk), "the thawed ext4 should need recovery again"

    # The writer resumes where it stopped: the frozen content, then more, no gaps.
    after = _wait_for_lines(ga, len(on_disk) + 10)
    assert after == list(range(1, len(after) + 1))
    assert after[:len(on_disk)] == on_disk
