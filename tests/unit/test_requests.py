"""The one request validator (client, coordinator and agent) and the wire vocabulary."""

from __future__ import annotations

import math

import pytest

from blocktxn.errors import InvalidInput
from blocktxn.requests import BackupOptions, BackupRequest, DiskRequest, Target, check_cut
from blocktxn.wire import backup_request_from_pb, backup_request_to_pb


@pytest.mark.parametrize("options,word", [
    (BackupOptions(mode="fast"), "mode"),
    (BackupOptions(quiesce="sleep"), "quiesce"),
    (BackupOptions(completion="some"), "completion"),
    (BackupOptions(freeze_timeout=-1), "freeze timeout"),
    (BackupOptions(freeze_timeout=3601), "freeze timeout"),
    (BackupOptions(freeze_timeout=math.nan), "freeze timeout"),
    (BackupOptions(deadline=-5), "in the past"),
    (BackupOptions(deadline=1e9), "deadline"),
    (BackupOptions(speed=-1), "negative"),
    (BackupOptions(speed=2**64 - 1), "speed"),
    (BackupOptions(request_id="a b"), "request id"),
])
def test_bad_options_are_invalid_input(options: BackupOptions, word: str) -> None:
    with pytest.raises(InvalidInput, match=word):
        BackupRequest((("h1/vm", ""),), options).check()


def test_targets_are_parsed_once() -> None:
    req = BackupRequest((("h1/vm", ""), ("h2/vm/d0", "full")), BackupOptions(mode="incremental"))
    assert req.check() == [(Target("h1", "vm"), "incremental"), (Target("h2", "vm", "d0"), "full")]
    for bad in ("h1", "h1/vm/d0/x", "h1/../x", "h1/vm/"):
        with pytest.raises(InvalidInput):
            BackupRequest(((bad, ""),)).check()
    with pytest.raises(InvalidInput, match="no targets"):
        BackupRequest(()).check()


def test_a_request_survives_the_wire() -> None:
    req = BackupRequest((("h1/vm", ""), ("h2/vm/d0", "full")),
                        BackupOptions("incremental", "individual", "freeze", 2.5, 60, 1 << 20,
                                      "req-1"))
    assert backup_request_from_pb(backup_request_to_pb(req)) == req


def test_an_agent_cut_is_checked_before_anything_happens() -> None:
    check_cut("t1", [DiskRequest("vm", "d0"), DiskRequest("vm", "d1", "full", 5)], "none", 0)
    for disks, quiesce, timeout, word in (
            ([], "none", 0, "no members"),
            ([DiskRequest("vm", "d0")] * 2, "none", 0, "named twice"),
            ([DiskRequest("vm", "d0", "weekly")], "none", 0, "mode"),
            ([DiskRequest("vm", "d0")], "nap", 0, "quiesce"),
            ([DiskRequest("vm", "d0")], "none", 4000, "freeze timeout"),
            ([DiskRequest("v m", "d0")], "none", 0, "VM name")):
        with pytest.raises(InvalidInput, match=word):
            check_cut("t1", disks, quiesce, timeout)


def test_waits_intervals_reasons_and_counts_have_ranges() -> None:
    from blocktxn.requests import MAX_TARGETS, check_interval, check_reason, check_wait

    assert check_wait(0, "t") is None and check_wait(2.5, "t") == 2.5
    assert check_interval(0) == 0.25 and check_interval(1) == 1
    for bad in (math.nan, math.inf, -1.0, 1e12):
        with pytest.raises(InvalidInput, match="timeout"):
            check_wait(bad, "prepare timeout")
    for bad in (1e-6, math.nan, 1e9, -1.0):
        with pytest.raises(InvalidInput, match="interval"):
            check_interval(bad)
    assert check_reason("x" * 1024)
    with pytest.raises(InvalidInput, match="reason"):
        check_reason("x" * 1025)
    with pytest.raises(InvalidInput, match="targets"):
        BackupRequest(tuple((f"h/vm{i}", "") for i in range(MAX_TARGETS + 1))).check()
    with pytest.raises(InvalidInput, match="members"):
        check_cut("t", [DiskRequest("vm", f"d{i}") for i in range(MAX_TARGETS + 1)], "none", 0)
    with pytest.raises(InvalidInput, match="deadline"):
        BackupRequest((("h/vm", ""),), BackupOptions(deadline=math.inf)).check()
