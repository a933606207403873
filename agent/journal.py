"""The participant's local journal: every journaled event, fsynced before the
machine sees it, replayed through the same machine on restart, compacted to the
open transactions plus the most recent finished ones."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .jsonl import JsonLines, plain
from .participant import ParticipantMachine
from .participant_messages import (
    OPEN_PHASES,
    Aborted,
    Committed,
    CutDone,
    CutFailed,
    CutPlanned,
    Event,
    Freezing,
    ImageRecord,
    MemberFailed,
    MemberPlan,
    Prepared,
    StateError,
    Thawed,
    TxnPlan,
    VotedNo,
)

log = logging.getLogger(__name__)

KEEP_FINISHED = 200  # finished transactions remembered across compaction

_EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (CutPlanned, Freezing, CutDone, CutFailed, Thawed, MemberFailed, Prepared,
                VotedNo, Committed, Aborted)
}


def event_to_record(txn_id: str, event: Event) -> dict[str, Any]:
    """A JSON-able dict for one journaled event."""
    return {"txn": txn_id, "type": type(event).__name__, "data": plain(event)}


def event_from_record(record: dict[str, Any]) -> tuple[str, Event]:
    """Inverse of :func:`event_to_record`.

    Raises:
        ValueError: the record is not a known event.
    """
    cls = _EVENT_TYPES.get(record.get("type", ""))
    if cls is None:
        raise ValueError(f"unknown journal record type {record.get('type')!r}")
    data = dict(record["data"])
    if cls is CutPlanned:
        p = data["plan"]
        members = tuple(
            MemberPlan(**{**m, "stale_bitmaps": tuple(m["stale_bitmaps"])}) for m in p["members"]
        )
        data["plan"] = TxnPlan(p["txn_id"], members, p["quiesce"], p["freeze_timeout"],
                               bool(p.get("individual", False)))
    elif cls is CutDone:
        data["bytes_total"] = tuple(tuple(x) for x in data["bytes_total"])
    elif cls in (Prepared, Committed):
        data["images"] = tuple(ImageRecord(**i) for i in data["images"])
        if "left_out" in data:
            data["left_out"] = tuple(tuple(x) for x in data["left_out"])
    return str(record["txn"]), cls(**data)


class Journal:
    """Durable record of every participant state change of one agent."""

    def __init__(self, path: Path) -> None:
        self.file = JsonLines(path)

    def append(self, txn_id: str, event: Event) -> None:
        """Write one event and (unless its class says ``fsync = False``) fsync it before
        returning."""
        self.file.append([event_to_record(txn_id, event)], sync=event.fsync)

    def replay(self, machine: ParticipantMachine) -> None:
        """Feed every journaled event to *machine* (commands are not run: recovery
        re-drives the open transactions); then compact."""
        records = self.file.read()
        for record in records:
            try:
                txn_id, event = event_from_record(record)
                machine.handle(txn_id, event)
            except (StateError, ValueError, KeyError, TypeError) as err:
                log.error("journal record skipped (%s): %s", err, record)
        self.compact(machine, 0, records)
        log.info("journal replayed: %d records, open: %s", len(records), machine.open_txns())

    def compact(self, machine: ParticipantMachine, slack: int = KEEP_FINISHED,
                records: list[dict[str, Any]] | None = None) -> set[str]:
        """Once more than KEEP_FINISHED + *slack* transactions are finished, forget all
        but the newest KEEP_FINISHED of them, in *machine* and in the file; return the
        ids forgotten. (With the default slack this runs once per KEEP_FINISHED
        transactions, so the rewrite costs O(1) per transaction, amortised.)"""
        finished = [t for t, st in machine.txns.items() if st.phase not in OPEN_PHASES]
        if len(finished) <= KEEP_FINISHED + slack:
            return set()
        drop = set(finished[:-KEEP_FINISHED])
        kept = self.file.read() if records is None else records
        self.file.rewrite(r for r in kept if r.get("txn") not in drop)
        for t in drop:
            del machine.txns[t]
        log.info("journal compacted: %d finished transactions forgotten", len(drop))
        return drop

    def close(self) -> None:
        self.file.close()
