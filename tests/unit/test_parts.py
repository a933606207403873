"""A transaction record and a backup set split into a header and one part per agent
(coordinator/parts.py) join back into what was split, whatever the order of members;
a header of an earlier version (everything in itself) reads as it is; parts that do not
fit together are an error, never a silently shorter record; batches never pass their
budget but for a single larger part."""

from __future__ import annotations

from dataclasses import replace

import pytest

from blocktxn.coordinator.errors import StoreCorruptError
from blocktxn.coordinator.parts import (
    BATCH_BYTES,
    batches,
    join_set,
    join_txn,
    requests,
    split_set,
    split_txn,
)
from blocktxn.coordinator.records import MemberRecord, SetImage, TxnRecord, VoteRecord
from blocktxn.coordinator.txn_messages import Decision, TxnPhase


def _record() -> TxnRecord:
    # members in request order, agents interleaved: the join must keep that order
    members = (MemberRecord("h2", "vm1", "d0", "auto"), MemberRecord("h1", "vm1", "d0", "full"),
               MemberRecord("h2", "vm2", "d1", "auto"), MemberRecord("h3", "db", "d0", "auto"),
               MemberRecord("h1", "vm1", "d1", "full"))
    images = tuple(SetImage(m.agent_id, m.vm, m.disk, f"images/{m.vm}/{m.disk}/t.qcow2", "",
                            "full", 10, 20, "ab" * 32, 5.0, "blocktxn:t")
                   for m in members if m.agent_id != "h3")
    return TxnRecord(
        "tx-20261203-080000-abcdef", "r-1", "grouped", "freeze", 10.0, 2e9, 0, 1e9, members,
        (("h1", "10.0.0.1:7401"), ("h2", "10.0.0.2:7401"), ("h3", "10.0.0.3:7401")),
        phase=TxnPhase.DONE, decision=Decision.COMMIT, reason="all voted yes",
        committed=("h1", "h2", "h3"),
        votes=(VoteRecord("h1", True, "", 3.0), VoteRecord("h3", True, "x", 4.0),
               VoteRecord("h2", True, "", 5.0)),
        images=images, set_id="tx-20261203-080000-abcdef", group="web", done_at=7.0)


def test_a_record_splits_into_a_small_header_and_joins_back_whole() -> None:
    record = _record()
    header, parts = split_txn(record)
    assert (header.members, header.agents, header.votes, header.images) == ((), (), (), ())
    assert header.phase == TxnPhase.DONE and header.reason == "all voted yes"
    assert sorted(parts) == ["h1", "h2", "h3"]
    assert [m.disk for m in parts["h2"].members] == ["d0", "d1"]
    assert parts["h3"].vote == VoteRecord("h3", True, "x", 4.0) and parts["h3"].images == ()
    # any order of parts: the same record (votes by time, committed by agent)
    assert join_txn(header, reversed(list(parts.values())), "k") == record
    assert join_txn(record, [], "k") == record   # an earlier version's record, whole


def test_parts_that_do_not_fit_together_are_an_error() -> None:
    header, parts = split_txn(_record())
    with pytest.raises(StoreCorruptError):
        join_txn(header, [], "k")                    # a header of parts without them
    with pytest.raises(StoreCorruptError):
        join_txn(header, [parts["h1"], parts["h3"]], "k")   # one agent's part missing
    with pytest.raises(StoreCorruptError):
        join_txn(header, [*parts.values(), parts["h1"]], "k")  # one twice
    with pytest.raises(StoreCorruptError):
        join_txn(header, [replace(parts["h1"], at=(0,)), parts["h2"], parts["h3"]], "k")


def test_a_set_splits_by_agent_and_joins_back_whole() -> None:
    record = _record()
    backup_set = record.backup_set(9.0)
    assert backup_set is not None
    header, parts = split_set(backup_set)
    assert header.images == () and header.bytes == backup_set.bytes
    assert sorted(parts) == ["h1", "h2"]
    assert join_set(header, parts.values(), "k") == backup_set
    assert join_set(backup_set, [], "k") == backup_set
    with pytest.raises(StoreCorruptError):
        join_set(header, [], "k")


def test_batches_keep_within_their_budget_but_for_a_single_larger_part() -> None:
    sizes = [100, 200, 300, 50, 400, 10]
    runs = batches(sizes, budget=450, most=3)
    assert [i for run in runs for i in run] == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in run) <= 450 and len(run) <= 3
               for run in runs if len(run) > 1)
    assert batches([1000, 10], budget=450) == [[0], [1]]
    assert requests([10, 20], 5, 2) == [35]                    # all in one request
    big = [BATCH_BYTES // 2 + 1] * 3
    assert requests(big, 5, 2) == [*big, 5]                    # parts first, headers last


def test_with_members_changes_only_that_agents_members_in_their_places() -> None:
    record = _record()
    done = record.with_members("h2", lambda m: m.completed("committed"))
    assert [m.outcome for m in done.members] == ["committed", "", "committed", "", ""]
    assert done.members_of("h1") == record.members_of("h1") == (
        record.members[1], record.members[4])
    again = done.with_members("h1", lambda m: m.completed("aborted"))
    assert [m.outcome for m in again.members] == [
        "committed", "aborted", "committed", "", "aborted"]
    assert [m.outcome for m in done.members] == ["committed", "", "committed", "", ""]
    assert again.with_members("nobody", lambda m: m.completed("x")).members == again.members
