"""A transaction is DONE to its watchers only once its final record and its backup set
are durable: found by the soak run, where a client read a set id from a DONE
transaction and the set was not in etcd yet (the final write was being retried)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from blocktxn.coordinator.driver import TxnDriver
from blocktxn.coordinator.records import BackupSet, MemberRecord, SetImage, TxnRecord
from blocktxn.coordinator.txn_machine import TxnMachine
from blocktxn.coordinator.txn_messages import Acked, Decision, TxnPhase


class SlowStore:
    """put_txn waits until the test lets it finish."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.written: list[tuple[TxnRecord, BackupSet | None]] = []

    async def put_txn(self, fence: int, record: TxnRecord, backup_set: BackupSet | None,
                      ) -> None:
        await self.release.wait()
        self.written.append((record, backup_set))


def decided_record() -> TxnRecord:
    image = SetImage("h1", "vm1", "d0", "images/vm1/d0/tx-1.qcow2", "", "full", 1, 1, "ab",
                     1e9, "blocktxn:tx-1")
    return TxnRecord(txn_id="tx-1", request_id="r-1", completion="grouped", quiesce="none",
                     freeze_timeout=10.0, deadline=2e9, speed=0, created_at=1e9,
                     members=(MemberRecord("h1", "vm1", "d0", "auto"),),
                     agents=(("h1", "127.0.0.1:1"),), images=(image,))


def decided_machine() -> TxnMachine:
    m = TxnMachine("tx-1", ("h1",), started=True, phase=TxnPhase.DECIDED,
                   decision=Decision.COMMIT, committed=("h1",))
    p = m.parts["h1"]
    p.cut = p.thawed = p.vote = True
    return m


async def _seen_while_the_final_write_waits() -> tuple[list[Any], list[Any], int]:
    store = SlowStore()
    machine = decided_machine()
    record = replace(decided_record().with_machine(machine))
    driver = TxnDriver(record, machine, store, None, lambda: 1, "c1",  # type: ignore[arg-type]
                       lambda d: None)
    seen: list[tuple[Any, str]] = []
    driver.start(Acked("h1"))  # the last acknowledgement: the machine says Finish
    for _ in range(20):
        await asyncio.sleep(0)
        seen.append((driver.record.phase, driver.record.set_id))
    store.release.set()
    assert driver.task is not None
    await driver.task
    after = [(driver.record.phase, driver.record.set_id)]
    return seen, after, len(store.written)


def test_done_and_the_set_id_are_shown_only_after_the_final_write() -> None:
    seen, after, writes = asyncio.run(_seen_while_the_final_write_waits())
    assert all(phase != TxnPhase.DONE and not set_id for phase, set_id in seen), seen
    assert after == [(TxnPhase.DONE, "tx-1")] and writes == 1
