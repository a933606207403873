"""A transaction is DONE to its watchers only once its final record and its backup set
are durable: found by the soak run, where a client read a set id from a DONE
transaction and the set was not in etcd yet (the final write was being retried)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from blocktxn.coordinator.agent_client import ChosenMode, CutResult
from blocktxn.coordinator.driver import TxnDriver
from blocktxn.coordinator.records import BackupSet, MemberRecord, SetImage, TxnRecord
from blocktxn.coordinator.txn_machine import TxnMachine
from blocktxn.coordinator.txn_messages import Acked, Decision, StageReplied, TxnPhase


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


async def _watched_while_the_final_write_waits() -> list[tuple[TxnPhase, str]]:
    """What a WatchTransaction stream yields while the final write is in flight."""
    from pathlib import Path

    from blocktxn.coordinator.config import CoordinatorConfig
    from blocktxn.coordinator.runner import Coordinator
    from blocktxn.coordinator.store import Store

    coordinator = Coordinator(CoordinatorConfig("c1", "127.0.0.1:1", "127.0.0.1:1", None,
                                                Path("/nonexistent")), Store("127.0.0.1:1"))
    store = SlowStore()
    machine = decided_machine()
    driver = TxnDriver(decided_record().with_machine(machine), machine,
                       store, None, lambda: 1, "c1",  # type: ignore[arg-type]
                       coordinator._finished)
    coordinator.live["tx-1"] = driver

    async def stored(txn_id: str) -> TxnRecord:  # the final record, as etcd has it
        return store.written[-1][0]

    coordinator.get = stored  # type: ignore[method-assign]
    seen: list[tuple[TxnPhase, str]] = []

    async def watch() -> None:
        async for record in coordinator.watch("tx-1"):
            seen.append((record.phase, record.set_id))

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.05)
    driver.start(Acked("h1"))  # the machine is DONE now; the final write still waits
    await asyncio.sleep(1.5)   # longer than the watch's 1 s wait for a change
    store.release.set()
    await asyncio.wait_for(watcher, 5)
    return seen


def test_a_watch_ends_with_the_final_record_not_before_it() -> None:
    """Found by CI: `backup --wait --json` printed "committed" without a set id. The
    watch ended as soon as the machine said DONE, while the final record (with the set
    id) was still being written, so its last record was the one before."""
    seen = asyncio.run(_watched_while_the_final_write_waits())
    assert seen[-1] == (TxnPhase.DONE, "tx-1"), seen


class CutsAtOnce:
    """An agent of an older version: it ignores stage_only and cuts (freezes, starts
    its jobs) at once."""

    def __init__(self) -> None:
        self.asked: list[bool] = []

    def client(self, agent_id: str, address: str) -> CutsAtOnce:
        return self

    async def cut(self, txn_id: str, disks: Any, quiesce: str, freeze_timeout: float,
                  individual: bool, stage_only: bool) -> CutResult:
        self.asked.append(stage_only)
        return CutResult((ChosenMode("vm1", "d0", "full", "first backup", 1),), 1e9, 1e9 + 0.1)


def test_an_agent_that_cuts_when_asked_to_stage_fails_the_stage_round() -> None:
    """The stage round is refused for an agent that cut instead of staging (an older
    agent does not know stage_only): its guest is frozen outside the cut round, so the
    transaction must abort (which thaws it and rolls its jobs back), naming the agent."""
    async def run() -> Any:
        record = replace(decided_record(), images=())
        machine = TxnMachine("tx-1", ("h1",))
        agent = CutsAtOnce()
        driver = TxnDriver(record, machine, None, agent, lambda: 1, "c1",  # type: ignore[arg-type]
                           lambda d: None)
        reply = await driver._cut("h1", stage_only=True)
        return agent.asked, reply

    asked, reply = asyncio.run(run())
    assert asked == [True]
    assert isinstance(reply, StageReplied) and not reply.ok
    assert "agent h1 cut at once" in reply.error and "upgrade" in reply.error
