"""One driver per transaction: an event loop that feeds the pure machine, executes
its commands against the agents and etcd, and turns their results into events and
record updates. Failpoints crash the process at exact protocol steps (tests)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Protocol, TypeVar

from blocktxn import failpoints
from blocktxn.errors import InvalidInput
from blocktxn.requests import DiskRequest, cut_text

from . import clock
from .agent_client import AgentClient
from .errors import AgentCallError, NotLeaderError, TxnStateError
from .records import MAX_ERROR_TEXT, DecisionRecord, MemberRecord, TxnRecord
from .registry import AgentRegistry
from .store import Store, retry_while_unavailable
from .txn_machine import TxnMachine
from .txn_messages import (
    Acked,
    CutReplied,
    DeadlinePassed,
    DecisionDurable,
    Finish,
    Persisted,
    PersistRunning,
    SendAbort,
    SendCommit,
    SendCut,
    SendPrepare,
    SendStage,
    SendThaw,
    StageReplied,
    ThawReplied,
    TxnCommand,
    TxnEvent,
    TxnPhase,
    VoteReplied,
    WriteDecision,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class _OnDisk(Protocol):
    @property
    def vm(self) -> str: ...
    @property
    def disk(self) -> str: ...


D = TypeVar("D", bound=_OnDisk)


def _by_disk(items: Iterable[D], change: Callable[[MemberRecord, D], MemberRecord]
             ) -> Callable[[MemberRecord], MemberRecord]:
    """A member update that applies *change* with the item reported for its disk."""
    found = {(i.vm, i.disk): i for i in items}

    def apply(m: MemberRecord) -> MemberRecord:
        item = found.get((m.vm, m.disk))
        return m if item is None else change(m, item)
    return apply


class TxnDriver:
    """A transaction this leader drives: its record, its machine, its loop."""

    def __init__(self, record: TxnRecord, machine: TxnMachine, store: Store,
                 registry: AgentRegistry, fence: Callable[[], int], name: str,
                 on_done: Callable[[TxnDriver], None]) -> None:
        self.record = record
        self.machine = machine
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._events: asyncio.Queue[TxnEvent] = asyncio.Queue()
        self._store, self._registry, self._fence = store, registry, fence
        self._name, self._on_done = name, on_done

    @property
    def txn_id(self) -> str:
        return self.record.txn_id

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self, first: TxnEvent) -> None:
        """Run the loop, beginning with *first* (Begin, or Resumed after replay)."""
        self._events.put_nowait(first)
        self.task = asyncio.create_task(self._loop(), name=f"txn-{self.txn_id}")

    def post(self, event: TxnEvent) -> None:
        self._events.put_nowait(event)

    def stop(self) -> None:
        if self.task:
            self.task.cancel()

    def notify(self) -> None:
        """Wake every watcher; later watchers wait on a fresh event."""
        self.changed.set()
        self.changed = asyncio.Event()

    def _sync(self) -> None:
        """Copy the machine's view into the record, and wake the watchers."""
        self.record = self.record.with_machine(self.machine, time.time())
        self.notify()

    # ------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        tasks: set[asyncio.Task[None]] = set()
        timer = asyncio.create_task(self._deadline_timer())
        try:
            while True:
                event = await self._events.get()
                try:
                    commands = self.machine.handle(event)
                except TxnStateError as err:  # a bug: the machine is unchanged, say so
                    log.error("txn %s: %s", self.txn_id, err)
                    self.record = self.record.with_error(str(err))
                    continue
                self.machine.validate()
                if any(isinstance(cmd, Finish) for cmd in commands):
                    await self._finish()  # DONE is shown once it is durable, not before
                    return
                self._sync()
                _failpoints(commands)
                for cmd in commands:
                    task = asyncio.create_task(self._execute(cmd))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        except NotLeaderError as err:
            log.warning("txn %s: %s", self.txn_id, err)
        except Exception:
            log.exception("txn %s: driver failed", self.txn_id)
            raise
        finally:
            timer.cancel()
            for t in tasks:
                t.cancel()
            self._on_done(self)
            self.changed.set()

    async def _deadline_timer(self) -> None:
        await asyncio.sleep(max(0.0, self.record.deadline - time.time()))
        self.post(DeadlinePassed())

    async def _execute(self, cmd: TxnCommand) -> None:
        try:
            event = await self._run(cmd)
        except NotLeaderError as err:
            log.warning("txn %s: deposed: %s", self.txn_id, err)
            self.stop()
            return
        except Exception as err:  # a bug: keep the transaction alive, record it
            log.exception("txn %s: %r failed", self.txn_id, cmd)
            self.record = self.record.with_error(f"{type(cmd).__name__}: {err}")
            return
        self.post(event)

    async def _run(self, cmd: TxnCommand) -> TxnEvent:
        if isinstance(cmd, SendStage):
            return await self._cut(cmd.agent_id, stage_only=True)
        if isinstance(cmd, SendCut):
            return await self._cut(cmd.agent_id)
        if isinstance(cmd, SendThaw):
            return await self._thaw(cmd.agent_id)
        if isinstance(cmd, PersistRunning):
            running = replace(self.record, phase=TxnPhase.RUNNING)
            await self._retry_store(lambda: self._store.put_txn(self._fence(), running))
            return Persisted()
        if isinstance(cmd, SendPrepare):
            return await self._prepare(cmd.agent_id)
        if isinstance(cmd, WriteDecision):
            mine = DecisionRecord(self.txn_id, cmd.decision, cmd.reason, cmd.committed,
                                  time.time(), self._name)
            durable = await self._retry_store(lambda: self._store.decide(mine, self._fence()))
            self.record = replace(self.record, decided_at=time.time())
            return DecisionDurable(durable.decision, durable.reason, durable.committed)
        if isinstance(cmd, (SendCommit, SendAbort)):
            return await self._complete(cmd)
        raise AssertionError(f"unknown command {cmd!r}")

    # ------------------------------------------------------------- commands
    def _client(self, agent_id: str) -> AgentClient:
        return self._registry.client(agent_id, self.record.address(agent_id))

    async def _retry_store(self, write: Callable[[], Awaitable[T]]) -> T:
        return await retry_while_unavailable(write)

    async def _cut(self, agent_id: str, stage_only: bool = False) -> TxnEvent:
        """The stage round (*stage_only*) or the cut round, at one agent."""
        reply = StageReplied if stage_only else CutReplied
        r = self.record
        disks = [DiskRequest(m.vm, m.disk, m.mode, r.speed) for m in r.members_of(agent_id)]
        try:
            cut = await self._client(agent_id).cut(self.txn_id, disks, r.quiesce,
                                                   r.freeze_timeout, not r.grouped, stage_only)
        except AgentCallError as err:
            return reply(agent_id, False, err.details or err.code.name)
        except InvalidInput as err:  # nothing was sent
            return reply(agent_id, False, str(err))
        if stage_only and cut.cut_at:  # it ignored stage_only (field 6 of CutRequest)
            return reply(agent_id, False, f"agent {agent_id} cut at once when asked to "
                         "stage: it does not know staging (an older version?); upgrade it")
        chosen = _by_disk(cut.disks, lambda m, c: m.cut_as(c.mode, c.reason, c.bytes_total))
        self.record = self.record.with_members(agent_id, chosen)
        if not stage_only:
            self.record = self.record.with_frozen_at(cut.frozen_at)
        return reply(agent_id, True)

    async def _thaw(self, agent_id: str) -> TxnEvent:
        try:
            thaw = await self._client(agent_id).thaw(self.txn_id)
        except AgentCallError as err:
            return ThawReplied(agent_id, False, err.details)
        self.record = self.record.with_thawed_at(thaw.thawed_at)
        return ThawReplied(agent_id, True, on_own=thaw.thawed_on_own)

    async def _prepare(self, agent_id: str) -> TxnEvent:
        progress = asyncio.create_task(self._follow(agent_id))
        remaining = max(1.0, self.record.deadline - time.time())
        try:
            ballot = await self._client(agent_id).prepare(self.txn_id, remaining)
        except AgentCallError as err:
            return VoteReplied(agent_id, False, err.describe())
        finally:
            progress.cancel()
        prepared = _by_disk(ballot.prepared, lambda m, p: m.prepared(p.bytes))
        self.record = self.record.with_members(agent_id, prepared)
        reason = ballot.reason if not ballot.yes else "; ".join(
            f"left out {agent_id}/{why}" for why in ballot.left_out)
        return VoteReplied(agent_id, ballot.yes, reason)

    async def _follow(self, agent_id: str) -> None:
        """Copy an agent's progress stream into the record (best effort)."""
        with contextlib.suppress(AgentCallError, asyncio.CancelledError):
            async for disks in self._client(agent_id).status(self.txn_id, 3600):
                progressed = _by_disk(disks, lambda m, d: m.progressed(
                    d.job_status, d.bytes_done, d.bytes_total))
                self.record = self.record.with_members(agent_id, progressed)
                self.notify()

    async def _complete(self, cmd: SendCommit | SendAbort) -> TxnEvent:
        """Deliver the decision; retried until acknowledged. A COMMIT is durable, so
        an agent that cannot apply it yet (any error) is asked again until it has
        published: the backup set is recorded only with every member. An ABORT an
        agent refuses outright is logged and counted as delivered."""
        client = self._client(cmd.agent_id)
        delay = 0.2
        while True:
            try:
                if isinstance(cmd, SendCommit):
                    images = await client.commit(self.txn_id)
                    self.record = self.record.with_images(images)
                    failpoints.hit("after_commit_sent")
                    outcome = "committed"
                else:
                    await client.abort(self.txn_id, cmd.reason)
                    outcome = "aborted"
                self.record = self.record.with_outcome(cmd.agent_id, outcome)
                return Acked(cmd.agent_id)
            except AgentCallError as err:
                if not err.retryable:
                    log.error("txn %s: %s", self.txn_id, err.describe())
                    if self.record.errors[-1:] != (cut_text(err.describe(), MAX_ERROR_TEXT),):
                        self.record = self.record.with_error(err.describe())
                    if isinstance(cmd, SendAbort):
                        return Acked(cmd.agent_id)
                await asyncio.sleep(delay)
                delay = min(2.0 if err.retryable else 5.0, delay * 2)
                # the agent may be back elsewhere: ask at the address it registered last
                client = await self._registry.current(cmd.agent_id,
                                                      self.record.address(cmd.agent_id))

    async def _finish(self) -> None:
        """Write the final record, and the backup set when something committed; only
        then do watchers see DONE and the set id (a client that reads them must find the
        set)."""
        final = replace(self.record.with_machine(self.machine, time.time()),
                        done_at=time.time())
        backup_set = final.backup_set(clock.now())
        if backup_set is not None:
            final = replace(final, set_id=backup_set.set_id)
        await self._retry_store(lambda: self._store.put_txn(self._fence(), final, backup_set))
        self.record = final
        self.notify()
        log.info("txn %s done: %s %s", self.txn_id,
                 self.record.decision.value if self.record.decision else "", self.record.reason)


def _failpoints(commands: list[TxnCommand]) -> None:
    """Crash here if a failpoint names the step these commands begin."""
    kinds = {type(c) for c in commands}
    for kind, point in ((SendStage, "before_stage"), (SendCut, "before_cut"),
                        (SendThaw, "after_cut"),
                        (PersistRunning, "after_thaw"), (SendCommit, "after_decision"),
                        (SendAbort, "after_decision")):
        if kind in kinds:
            failpoints.hit(point)
