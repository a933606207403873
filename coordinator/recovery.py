"""How a new leader takes over: it reloads every open transaction record and its
decision from etcd, and rebuilds each machine by replaying those durable facts
through the same machine (commands discarded); the driver then feeds ``Resumed``:
decided -> resend the decision, running -> re-query the agents, cutting -> abort."""

from __future__ import annotations

import logging
from collections.abc import Container
from typing import TYPE_CHECKING

from .records import DecisionRecord, TxnRecord
from .txn_machine import TxnMachine
from .txn_messages import DecisionDurable, MarkedRunning, RecordLoaded, TxnEvent, TxnPhase

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)


def history(record: TxnRecord, decision: DecisionRecord | None) -> list[TxnEvent]:
    """The durable facts of a transaction, as events, oldest first."""
    events: list[TxnEvent] = [RecordLoaded()]
    if record.phase == TxnPhase.RUNNING:
        events.append(MarkedRunning())
    if decision is not None:
        events.append(DecisionDurable(decision.decision, decision.reason, decision.committed))
    return events


def rebuild(record: TxnRecord, decision: DecisionRecord | None) -> TxnMachine:
    """The machine after replaying *record* and *decision*; feed it ``Resumed`` next.

    Raises:
        TxnStateError: the durable records contradict each other.
    """
    machine = TxnMachine(record.txn_id, record.agent_ids, record.grouped, record.quiesce)
    for event in history(record, decision):
        machine.handle(event)  # replay: the commands were executed by an earlier leader
        machine.validate()
    return machine


async def open_transactions(store: Store, skip: Container[str]
                            ) -> list[tuple[TxnRecord, DecisionRecord | None]]:
    """Every transaction not done (and not in *skip*), with its durable decision.

    Raises:
        StoreUnavailableError, StoreCorruptError.
    """
    found = []
    for record in await store.txns():
        if record.phase == TxnPhase.DONE or record.txn_id in skip:
            continue
        decision = await store.get_decision(record.txn_id)
        log.info("resuming %s (%s, decision %s)", record.txn_id, record.phase.value,
                 decision and decision.decision.value)
        found.append((record, decision))
    return found
