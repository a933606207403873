"""One coordinator replica: composes the election, the agent registry, recovery and
one driver per open transaction, and answers the operations the service exposes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Coroutine

import grpc

from blocktxn import retention
from blocktxn.ids import check_id
from blocktxn.requests import BackupRequest, Target, check_reason

from . import planner, recovery
from .agent_client import ImageCheck, RestoreResult
from .config import CoordinatorConfig
from .driver import TxnDriver
from .election import Election
from .encoding import final_write_bound
from .errors import (
    AgentCallError,
    NotFoundError,
    NotLeaderError,
    PreconditionError,
    RequestError,
    StoreUnavailableError,
)
from .heartbeats import heartbeat_service
from .keepalive import LeaseKeeper
from .metrics import CoordinatorMetrics
from .notify import Notifier
from .pruner import MAX_SETS, Pruner
from .records import (
    AgentEntry,
    AgentInventory,
    AuditRecord,
    BackupSet,
    DecisionRecord,
    ScheduleState,
    TxnRecord,
)
from .registry import AgentRegistry
from .schedule import Schedule
from .scheduler import Scheduler
from .store import ETCD_MAX_REQUEST, REQUEST_MARGIN, Store
from .txn_machine import TxnMachine
from .txn_messages import OPEN, Begin, CancelRequested, DeadlinePassed, Decision, Resumed, TxnPhase

log = logging.getLogger(__name__)
WATCH_EVERY = 0.25  # s between two snapshots of a watched transaction of more than
WATCH_BIG = 64      # this many members


class Coordinator:
    """One replica. Leads when it holds the etcd leader key."""

    def __init__(self, config: CoordinatorConfig, store: Store,
                 metrics: CoordinatorMetrics | None = None,
                 keeper: LeaseKeeper | None = None) -> None:
        """*keeper*: the lease keeper (its own thread and etcd connection); by default
        one on a connection like *store*'s."""
        self.config = config
        self.store = store
        self.keeper = keeper or LeaseKeeper(lambda: store.twin())
        self.registry = AgentRegistry(store, config.tls, self.keeper)
        self.heartbeat_address = ""  # set by the keeper's thread once its server listens
        self.keeper.serve(heartbeat_service(
            self.registry, config.heartbeat_listen or f"{config.listen.rpartition(':')[0]}:0",
            config.advertise.rpartition(":")[0], config.tls, config.roles,
            self._heartbeats_at))
        self.election = Election(store, self.keeper, config.name,
                                 f"{config.name}@{config.advertise}",
                                 on_elected=self._resume_all, on_deposed=self._drop_all)
        self.live: dict[str, TxnDriver] = {}
        self._adopting: set[asyncio.Future[None]] = set()
        self.pruner = Pruner(store, self.registry, self.election.require)
        self.metrics = metrics or CoordinatorMetrics()
        self.metrics.watch(lambda: self.leads,
                           lambda: [d.record for d in list(self.live.values())])
        self.notifier = Notifier()
        self.scheduler = Scheduler(config.schedules, store, self.start_transaction,
                                   self.election.require, self.metrics, self.notifier)

    def _heartbeats_at(self, address: str) -> None:
        self.heartbeat_address = address
        log.info("heartbeats served at %s", address)

    @property
    def leads(self) -> bool:
        return self.election.epoch is not None

    def start(self) -> None:
        self.keeper.start()
        self.election.start()

    async def stop(self) -> None:
        self.scheduler.stop()
        await self.election.stop()
        await self.registry.close()
        await self.notifier.close()
        await asyncio.to_thread(self.keeper.stop)

    async def leader_address(self) -> str | None:
        """Raises: StoreUnavailableError, StoreCorruptError."""
        return await self.election.leader_address()

    # ------------------------------------------------------------ agents
    async def register_agent(self, agent_id: str, address: str, inventory: AgentInventory,
                             digest: str = "") -> None:
        """Raises: IdentifierError, RequestError, StoreUnavailableError."""
        await self.registry.register(agent_id, address, inventory, digest)

    async def heartbeat(self, agent_id: str, address: str, digest: str) -> bool:
        """A heartbeat without the inventory; False: send it (see AgentRegistry).

        Raises: IdentifierError, RequestError, StoreUnavailableError."""
        return await self.registry.heartbeat(agent_id, address, digest)

    async def agents(self) -> tuple[list[AgentEntry], set[str]]:
        """Raises: StoreUnavailableError, StoreCorruptError."""
        return await self.registry.listing()

    async def audit(self, since: float, limit: int) -> list[AuditRecord]:
        """The audit trail from *since* (unix time), oldest first, at most *limit*
        (1..1000; 0: 100).

        Raises: RequestError, StoreUnavailableError."""
        if not 0 <= limit <= 1000 or not math.isfinite(since) or since < 0:
            raise RequestError(f"audit: limit {limit} is not within 0..1000, or since "
                               f"{since} is negative")
        return await self.store.audit(since, limit or 100)

    async def schedules(self) -> list[tuple[Schedule, ScheduleState | None, TxnRecord | None]]:
        """Each configured schedule, what the leader did last for it, and the record of
        the transaction it started last (None once collected).

        Raises: StoreUnavailableError, StoreCorruptError."""
        states = {s.name: s for s in await self.store.schedule_states()}
        out = []
        for schedule in self.config.schedules:
            state = states.get(schedule.name)
            record = await self.store.get_txn(state.txn_id) if state and state.txn_id \
                else None
            out.append((schedule, state, record))
        return out

    # ----------------------------------------------------------- drivers
    def _drive(self, record: TxnRecord, machine: TxnMachine) -> TxnDriver:
        driver = TxnDriver(record, machine, self.store, self.registry, self.election.require,
                           self.config.name, self._finished)
        self.live[record.txn_id] = driver
        return driver

    def _finished(self, driver: TxnDriver) -> None:
        if driver.machine.phase == TxnPhase.DONE and self.live.get(driver.txn_id) is driver:
            del self.live[driver.txn_id]  # its final record is in etcd
            self.metrics.finished(driver.record)
            self.scheduler.finished(driver.record)
            # a group's policy runs after each committed backup of it, and after a
            # backup an agent refused for want of space (the next one may then fit)
            record = driver.record
            full = record.decision == Decision.ABORT and "repository full" in record.reason
            if (record.set_id or full) and record.group in self.config.retention \
                    and self.leads:
                self._adopt_task(self._auto_prune(record.group))

    async def _auto_prune(self, group: str) -> None:
        """After a committed backup of a group with a policy: apply it."""
        try:
            await self.prune(group, dry_run=False)
        except (NotLeaderError, StoreUnavailableError) as err:
            log.warning("prune of group %s after a backup skipped: %s", group, err)

    async def _resume_all(self) -> None:
        self.metrics.elections.inc()
        # a driver stopped when this replica was deposed (e.g. its transaction was
        # created in that instant) drives nothing: take its record over like any other
        self.live = {t: d for t, d in self.live.items() if d.running}
        for record, decision in await recovery.open_transactions(self.store, self.live):
            self._drive(record, recovery.rebuild(record, decision)).start(Resumed())
        await self.pruner.resume()
        self.scheduler.resume()

    def _drop_all(self) -> None:
        for driver in self.live.values():
            driver.stop()
        self.live.clear()
        self.pruner.stop()
        self.scheduler.stop()
        for task in self._adopting:
            task.cancel()

    async def _adopt(self, txn_id: str) -> TxnRecord | None:
        """Drive an open record that has no driver on this leader (the reply to its
        create was lost): as a new leader would, from its durable facts (cutting ->
        abort). Return the record, None if it does not exist.

        Raises:
            StoreUnavailableError, StoreCorruptError, TxnStateError.
        """
        record = await self.store.get_txn(txn_id)
        if record is None or record.phase == TxnPhase.DONE or not self.leads:
            return record
        decision = await self.store.get_decision(txn_id)
        if txn_id in self.live:  # taken over meanwhile
            return self.live[txn_id].record
        log.warning("txn %s: open without a driver here: taking it over", txn_id)
        driver = self._drive(record, recovery.rebuild(record, decision))
        driver.start(Resumed())
        return driver.record

    def _adopt_later(self, txn_id: str) -> None:
        """After a create whose outcome is unknown: once etcd answers, take the record
        over if it exists, so it never stays open without a driver."""
        async def attempt() -> None:
            delay = 0.2
            while self.leads:
                try:
                    await self._adopt(txn_id)
                    return
                except StoreUnavailableError:
                    await asyncio.sleep(delay)
                    delay = min(2.0, delay * 2)

        self._adopt_task(attempt())

    def _adopt_task(self, coro: Coroutine[object, object, None]) -> None:
        """Run *coro* in the background while this replica leads."""
        task = asyncio.ensure_future(coro)
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    # ---------------------------------------------------------- operations
    async def start_transaction(self, request: BackupRequest) -> TxnRecord:
        """Validate, persist, and start driving a transaction.

        Raises:
            InvalidInput, NotFoundError, PreconditionError, NotLeaderError,
            StoreUnavailableError, StoreCorruptError.
        """
        epoch = self.election.require()
        request.check()
        request_id = request.options.request_id or f"r{random.getrandbits(64):016x}"
        entries, live = await self.registry.entries()
        for driver in self.live.values():  # (after the await: a takeover may have begun)
            if driver.record.request_id == request_id:
                return driver.record
        busy = {m.key: d.txn_id for d in self.live.values() if d.machine.phase in OPEN
                for m in d.record.members}
        planned = planner.plan(request, entries, live, busy)
        now = time.time()
        record = planner.new_record(request, planned,
                                    planner.txn_id_at(now, random.getrandbits(24)),
                                    request_id, now, self.config.name)
        size = final_write_bound(record)
        if size > ETCD_MAX_REQUEST - REQUEST_MARGIN:
            raise RequestError(
                f"{len(record.members)} disks on {len(record.agents)} agents: one etcd "
                f"request of the transaction (an agent's share of it) could take {size} "
                f"bytes, more than etcd takes ({ETCD_MAX_REQUEST - REQUEST_MARGIN}); it "
                "could never be "
                "decided: split the targets into several backups (nothing was started)")
        try:
            existing = await self.store.create_txn(epoch, record)
        except StoreUnavailableError:
            self._adopt_later(record.txn_id)  # it may have been written all the same
            raise
        if existing is not None:  # the request id was used already: the same transaction
            if existing in self.live:
                return self.live[existing].record
            stored = await self._adopt(existing)
            if stored is None:
                raise NotFoundError(f"request {request_id} maps to a missing transaction")
            return stored
        if self.election.epoch != epoch:  # deposed meanwhile: the next leader takes it
            raise NotLeaderError(f"transaction {record.txn_id} recorded, but this replica "
                                 "no longer leads: the next leader aborts it; retry")
        machine = TxnMachine(record.txn_id, record.agent_ids, record.grouped, record.quiesce)
        self._drive(record, machine).start(Begin())
        return record

    async def cancel(self, txn_id: str, reason: str) -> TxnRecord:
        """Global abort before the decision.

        Raises:
            IdentifierError, NotFoundError, PreconditionError (already committed),
            NotLeaderError, StoreUnavailableError, StoreCorruptError.
        """
        check_id(txn_id, "transaction id")
        check_reason(reason)
        self.election.require()
        driver = self.live.get(txn_id)
        if driver is None:
            record = await self.store.get_txn(txn_id)
            if record is None:
                raise NotFoundError(f"unknown transaction {txn_id}")
            if record.decision == Decision.ABORT:
                return record
            already = record.decision.value if record.decision else ""
            raise PreconditionError(f"transaction {txn_id} is already {already}")
        driver.post(CancelRequested(f"cancelled: {reason or 'by request'}"))
        while driver.machine.decision is None and driver.running:
            await driver.changed.wait()
        if driver.machine.decision == Decision.COMMIT:
            raise PreconditionError(f"transaction {txn_id} was already decided COMMIT")
        return driver.record

    async def query_decision(self, txn_id: str) -> DecisionRecord | None:
        """The durable decision, or presumed abort past the deadline (any replica);
        None while the transaction may still commit.

        Raises:
            IdentifierError, NotFoundError, NotLeaderError, StoreUnavailableError,
            StoreCorruptError.
        """
        check_id(txn_id, "transaction id")
        decision = await self.store.get_decision(txn_id)
        if decision is None:
            record = await self.store.get_txn(txn_id)
            if record is None:
                raise NotFoundError(f"unknown transaction {txn_id}")
            if time.time() < record.deadline:
                return None
            decision = await self.store.decide(
                DecisionRecord.presumed_abort(txn_id, self.config.name), None)
            driver = self.live.get(txn_id)
            if driver is not None:
                driver.post(DeadlinePassed())
        return decision

    async def get(self, txn_id: str) -> TxnRecord:
        """Raises: IdentifierError, NotFoundError, StoreUnavailableError, StoreCorruptError."""
        check_id(txn_id, "transaction id")
        if txn_id in self.live:
            return self.live[txn_id].record
        record = await self.store.get_txn(txn_id)
        if record is None:
            raise NotFoundError(f"unknown transaction {txn_id}")
        if record.phase != TxnPhase.DONE:
            decision = await self.store.get_decision(txn_id)
            if decision is not None:
                record = record.with_decision(decision)
        return record

    async def list_txns(self, open_only: bool) -> list[TxnRecord]:
        """Raises: StoreUnavailableError, StoreCorruptError."""
        records = {r.txn_id: r for r in await self.store.txns()}
        for txn_id, driver in self.live.items():
            records[txn_id] = driver.record
        out = sorted(records.values(), key=lambda r: r.created_at)
        return [r for r in out if not open_only or r.phase != TxnPhase.DONE]

    async def watch(self, txn_id: str) -> AsyncIterator[TxnRecord]:
        """Yield the record each time it changes, until the transaction is done.

        Raises:
            IdentifierError, NotFoundError, StoreUnavailableError, StoreCorruptError.
        """
        while True:
            driver = self.live.get(txn_id)
            if driver is None:
                yield await self.get(txn_id)
                return
            waiter = driver.changed
            yield driver.record
            if driver.record.phase == TxnPhase.DONE:  # the final record, not the machine:
                return                                # DONE is shown once it is durable
            if len(driver.record.members) > WATCH_BIG:
                # a transaction of many agents changes with every reply, and each
                # snapshot is the whole record: one every WATCH_EVERY at most
                await asyncio.sleep(WATCH_EVERY)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), 1.0)

    async def backup_set(self, set_id: str) -> BackupSet:
        """Raises: IdentifierError, NotFoundError, StoreUnavailableError, StoreCorruptError."""
        check_id(set_id, "set id")
        found = await self.store.get_set(set_id)
        if found is None:
            raise NotFoundError(f"unknown backup set {set_id}")
        if found.removing:
            raise NotFoundError(f"backup set {set_id} is being removed")
        return found

    async def sets(self) -> list[BackupSet]:
        """Every backup set, oldest cut first (not those being removed).

        Raises:
            StoreUnavailableError, StoreCorruptError.
        """
        return sorted((s for s in await self.store.sets() if not s.removing),
                      key=lambda s: s.cut_at)

    # ---------------------------------------------------------- removal
    async def forget(self, set_ids: list[str], wait: float = 0.0
                     ) -> tuple[str, list[BackupSet], bool]:
        """Remove the chosen sets everywhere; return (prune id, the sets, done).

        Raises:
            IdentifierError, RequestError, NotFoundError, PreconditionError (the newest
            backup of a disk), NotLeaderError, StoreUnavailableError, StoreCorruptError.
        """
        if not 1 <= len(set_ids) <= MAX_SETS:
            raise RequestError(f"forget takes 1..{MAX_SETS} sets, not {len(set_ids)}")
        for set_id in set_ids:
            check_id(set_id, "set id")
        self.election.require()
        every = {s.set_id: s for s in await self.store.sets()}
        unknown = sorted(set(set_ids) - set(every))
        if unknown:
            raise NotFoundError(f"unknown backup set{'s' if len(unknown) > 1 else ''} "
                                f"{', '.join(unknown)}")
        chosen = [every[i] for i in dict.fromkeys(set_ids)]
        kept = [s for s in every.values() if not s.removing and s.set_id not in set_ids]
        for s in chosen:
            for disk in sorted(s.disks):
                if not any(k.cut_at > s.cut_at and disk in k.disks for k in kept):
                    raise PreconditionError(
                        f"backup set {s.set_id} holds the newest backup of {disk}: the "
                        f"next incremental builds on it (nothing was removed)")
        todo = [s for s in chosen if not s.removing]
        under_way = sorted({s.removing for s in chosen if s.removing})
        if not todo:  # another prune removes them: done once it is
            return "", chosen, await self._wait_all(under_way, wait)
        for s in todo:  # every agent can start now (nothing is changed otherwise)
            for agent_id in s.agents:
                client = await self.registry.owner(agent_id)
                try:
                    await client.forget(s.set_id, check_only=True)
                except AgentCallError as err:
                    if err.code == grpc.StatusCode.FAILED_PRECONDITION:
                        raise PreconditionError(f"{agent_id}: {err.details} (nothing was "
                                                "removed)") from err
                    raise
        prune = await self.pruner.submit(todo, "forget")
        return prune.prune_id, chosen, await self._wait_all([*under_way, prune.prune_id],
                                                            wait)

    async def _wait_all(self, prune_ids: list[str], seconds: float) -> bool:
        """Wait up to *seconds* for these prunes; return whether all are done."""
        if seconds > 0 and prune_ids:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(
                    *(self.pruner.wait(p) for p in prune_ids)), seconds)
        return all(self.pruner.done(p) for p in prune_ids)

    async def prune(self, group: str, dry_run: bool, wait: float = 0.0
                    ) -> tuple[str, list[tuple[BackupSet, retention.Verdict]], bool]:
        """Apply the retention policy of *group* (every group with one if ""); return
        (prune id or "", every set of those groups with its verdict, done).

        Raises:
            IdentifierError, NotFoundError (no policy for the group), NotLeaderError,
            StoreUnavailableError, StoreCorruptError.
        """
        if group:
            check_id(group, "retention group")
            if group not in self.config.retention:
                raise NotFoundError(f"no retention policy for group {group!r} (see the "
                                    "coordinator's --retention)")
        self.election.require()
        groups = [group] if group else sorted(self.config.retention)
        stored = await self.store.sets()
        every = [s for s in stored if not s.removing]
        under_way = sorted({s.removing for s in stored if s.removing and s.group in groups})
        rows: list[tuple[BackupSet, retention.Verdict]] = []
        for g in groups:
            mine = {s.set_id: s for s in every if s.group == g}
            infos = [retention.SetInfo(s.set_id, s.time, s.disks) for s in mine.values()]
            rows += [(mine[v.set_id], v)
                     for v in retention.plan(infos, self.config.retention[g])]
        removed = [s for s, v in rows if not v.keep]
        if dry_run:
            return "", rows, not removed
        if not removed:  # done once the removals of these groups under way are
            return "", rows, await self._wait_all(under_way, wait)
        why = f"prune {', '.join(groups)}"
        prune = await self.pruner.submit(removed[:MAX_SETS], why)
        return prune.prune_id, rows, await self._wait_all([*under_way, prune.prune_id], wait)

    async def restore(self, set_id: str, target: str, destination: str, fmt: str
                      ) -> RestoreResult:
        """Restore one disk of a set on the agent that holds its image.

        Raises:
            InvalidInput, NotFoundError, AgentCallError, StoreUnavailableError,
            StoreCorruptError.
        """
        bset = await self.backup_set(set_id)
        if len(target.split("/")) != 3:
            raise RequestError(f"restore target {target!r} is not AGENT/VM/DISK")
        t = Target.parse(target)
        if not any((i.agent_id, i.vm, i.disk) == (t.agent_id, t.vm, t.disk)
                   for i in bset.images):
            raise NotFoundError(f"backup set {set_id} has no image of {target}")
        client = await self.registry.owner(t.agent_id)
        return await client.restore(set_id, t.vm, t.disk, destination, fmt)

    async def verify(self, set_id: str) -> list[ImageCheck]:
        """Every image of a set checked by its agent (``AGENT:image``).

        Raises:
            IdentifierError, NotFoundError, StoreUnavailableError, StoreCorruptError.
        """
        bset = await self.backup_set(set_id)
        checks: list[ImageCheck] = []
        for agent_id in bset.agents:
            client = await self.registry.owner(agent_id)
            try:
                checks += [ImageCheck(f"{agent_id}:{c.image}", c.ok, c.problem)
                           for c in await client.verify(set_id)]
            except AgentCallError as err:
                checks.append(ImageCheck(f"{agent_id}:*", False, err.describe()))
        return checks
