"""Metric labels stay bounded: every abort the transaction machine decides falls in a
named reason class (never ``other``), and a bad ``--metrics-listen`` is refused."""

from __future__ import annotations

import pytest

from blocktxn import metrics
from blocktxn.coordinator.metrics import ABORT_CLASSES, abort_class
from blocktxn.coordinator.records import DecisionRecord
from blocktxn.coordinator.txn_machine import TxnMachine
from blocktxn.coordinator.txn_messages import (
    Begin,
    CancelRequested,
    CutReplied,
    DeadlinePassed,
    Persisted,
    RecordLoaded,
    Resumed,
    StageReplied,
    ThawReplied,
    TxnEvent,
    VoteReplied,
    WriteDecision,
)

AGENTS = ("a", "b")
STAGED = [Begin(), StageReplied("a", True), StageReplied("b", True)]
CUT = [*STAGED, CutReplied("a", True), CutReplied("b", True)]
RUN = [*CUT, ThawReplied("a", True), ThawReplied("b", True), Persisted()]


def decided(events: list[TxnEvent], grouped: bool = True) -> str:
    """The reason of the decision the machine asks to write after *events*."""
    m = TxnMachine("t", AGENTS, grouped=grouped)
    writes = [c for e in events for c in m.handle(e) if isinstance(c, WriteDecision)]
    assert len(writes) == 1, writes
    return writes[0].reason


@pytest.mark.parametrize(("events", "grouped", "expected"), [
    ([Begin(), StageReplied("a", False, "no such disk")], True, "cut_failed"),
    ([*STAGED, CutReplied("a", False, "guest agent gone")], True, "cut_failed"),
    ([*CUT, ThawReplied("a", False, "guest agent gone")], True, "thaw_failed"),
    ([*RUN, VoteReplied("a", False, "read error")], True, "voted_no"),
    ([*RUN, VoteReplied("a", False, "x"), VoteReplied("b", False, "y")], False, "voted_no"),
    ([*RUN, CancelRequested("cancelled: by request")], True, "cancelled"),
    ([*CUT, DeadlinePassed()], True, "deadline"),
    ([RecordLoaded(), Resumed()], True, "leader_changed"),
])
def test_every_abort_the_machine_decides_has_a_named_class(
    events: list[TxnEvent], grouped: bool, expected: str,
) -> None:
    reason = decided(events, grouped)
    assert abort_class(reason) == expected, reason
    assert expected in ABORT_CLASSES


def test_presumed_abort_and_unknown_texts() -> None:
    assert abort_class(DecisionRecord.presumed_abort("t", "c1").reason) == "deadline"
    assert abort_class("something else entirely") == "other"


@pytest.mark.parametrize("text", ["localhost", ":9100", "h:0", "h:65536", "h:x", "[::1]"])
def test_bad_metrics_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--metrics-listen"):
        metrics.parse_listen(text)


def test_good_metrics_addresses() -> None:
    assert metrics.parse_listen("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert metrics.parse_listen("[::1]:9100") == ("::1", 9100)
