"""A new leadership takes over every open record that has no running driver: a driver
left behind when this replica was deposed (its transaction started in the same instant)
must not hide the record (found by the chaos run, seed 2: a transaction stayed open
with its jobs pending on every agent)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from blocktxn.coordinator.config import CoordinatorConfig
from blocktxn.coordinator.records import MemberRecord, TxnRecord
from blocktxn.coordinator.runner import Coordinator


class OneOpenRecord:
    """The store's answers that a takeover reads."""

    def __init__(self, record: TxnRecord) -> None:
        self.record = record

    async def txns(self) -> list[TxnRecord]:
        return [self.record]

    async def get_decision(self, txn_id: str) -> None:
        return None

    async def prunes(self) -> list[Any]:
        return []


def record() -> TxnRecord:
    return TxnRecord(txn_id="tx-1", request_id="r-1", completion="grouped", quiesce="none",
                     freeze_timeout=10.0, deadline=2e9, speed=0, created_at=1e9,
                     members=(MemberRecord("h1", "vm1", "d0", "auto"),),
                     agents=(("h1", "127.0.0.1:1"),))


async def _takeover_with_a_stopped_driver_left() -> list[str]:
    config = CoordinatorConfig("c1", "127.0.0.1:1", "127.0.0.1:1", "x", Path("/nonexistent"))
    c = Coordinator(config, OneOpenRecord(record()))  # type: ignore[arg-type]
    c.live["tx-1"] = SimpleNamespace(running=False, record=record())  # type: ignore[assignment]
    driven: list[str] = []

    def drive(r: TxnRecord, machine: object) -> Any:
        driven.append(r.txn_id)
        return SimpleNamespace(start=lambda event: None)

    c._drive = drive  # type: ignore[method-assign,assignment]
    await c._resume_all()
    return driven


def test_a_stopped_driver_does_not_hide_an_open_record_from_the_next_leadership() -> None:
    assert asyncio.run(_takeover_with_a_stopped_driver_left()) == ["tx-1"]
