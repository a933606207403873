"""Scheduled backups on the leader: each due occurrence of each schedule becomes one
transaction (its request id derived from schedule and occurrence, so a leader change at
that moment cannot start a second one), and what happened is kept in etcd per schedule
(``ScheduleState``, one key each, rewritten) so the next leader goes on from there.
The catch-up policy after downtime is in ``schedule.py``."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from blocktxn import failpoints
from blocktxn.errors import BlocktxnError
from blocktxn.requests import BackupRequest

from .errors import NotLeaderError, StoreUnavailableError
from .metrics import CoordinatorMetrics
from .notify import Notifier
from .records import ScheduleState, TxnRecord
from .schedule import Schedule
from .store import Store, retry_while_unavailable
from .txn_messages import Decision

log = logging.getLogger(__name__)

MAX_SLEEP = 30.0  # s: look again at least this often (the wall clock may jump)
RETRY_AFTER = 5.0  # s after a pass that failed unexpectedly
#: a schedule no longer configured keeps its state this long (a replica with an older
#: configuration during a rolling change must not make the others forget it)
FORGET_AFTER = 30 * 86400.0
PREFIX = "sched-"


class Scheduler:
    def __init__(self, schedules: Sequence[Schedule], store: Store,
                 start: Callable[[BackupRequest], Awaitable[TxnRecord]],
                 epoch: Callable[[], int], metrics: CoordinatorMetrics,
                 notifier: Notifier) -> None:
        self.schedules = {s.name: s for s in schedules}
        self.store, self.start, self.epoch = store, start, epoch
        self.metrics, self.notifier = metrics, notifier
        self.states: dict[str, ScheduleState] = {}
        self._task: asyncio.Task[None] | None = None
        metrics.watch_schedules(self.next_runs)

    def resume(self) -> None:
        """On election: go on from the states the former leader left."""
        self.stop()
        if self.schedules:
            self._task = asyncio.create_task(self._run(), name="scheduler")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.states = {}  # a deposed replica exports no next runs

    def next_runs(self) -> dict[str, float]:
        """Schedule name -> its next occurrence (from what this leader knows)."""
        states = dict(self.states)
        return {n: s.next_after(states[n].last_at) for n, s in self.schedules.items()
                if n in states}

    async def _run(self) -> None:
        loaded = False
        try:
            while True:
                try:
                    if not loaded:
                        await self._load()
                        loaded = True
                    for schedule in self.schedules.values():
                        await self._tick(schedule, time.time())
                except StoreUnavailableError as err:
                    log.warning("scheduler: %s; trying again", err)
                    await asyncio.sleep(1.0)
                    continue
                except NotLeaderError:
                    raise
                except Exception:  # e.g. etcd refusing a write: never stop scheduling
                    log.exception("scheduler: this pass failed; trying again in %gs",
                                  RETRY_AFTER)
                    await asyncio.sleep(RETRY_AFTER)
                    continue
                wake = min(self.next_runs().values()) - time.time()
                await asyncio.sleep(min(max(wake, 0.01), MAX_SLEEP))
        except NotLeaderError:
            log.info("scheduler: this replica no longer leads")
        except Exception:
            log.exception("scheduler failed")
            raise

    async def _load(self) -> None:
        stored = {s.name: s for s in await retry_while_unavailable(self.store.schedule_states)}
        gone = sorted(n for n, s in stored.items() if n not in self.schedules
                      and s.handled_at < time.time() - FORGET_AFTER)
        await retry_while_unavailable(lambda: self.store.drop_schedule_states(
            self.epoch(), gone))
        now = time.time()
        for name in self.schedules:
            if name not in stored:  # first seen: occurrences from now on
                state = stored[name] = ScheduleState(name, now, "created", handled_at=now)
                await retry_while_unavailable(functools.partial(
                    self.store.put_schedule_state, self.epoch(), state))
        self.states = {n: stored[n] for n in self.schedules}

    async def _tick(self, schedule: Schedule, now: float) -> None:
        run, missed = schedule.due(self.states[schedule.name].last_at, now)
        if run is not None:
            state = await self._start(schedule, run, now)
            if state.outcome == "started":
                failpoints.hit("schedule_started")  # started, but not yet recorded as such
        elif missed is not None:
            # a former leader may have started it just before it went
            txn_id = await self.store.txn_of_request(schedule.request_id(missed))
            state = ScheduleState(
                schedule.name, missed, "started" if txn_id else "missed", txn_id or "",
                "" if txn_id else f"{now - missed:.0f}s late, more than its catch-up of "
                f"{schedule.catch_up:g}s (no leader meanwhile?)", now)
        else:
            return
        await self.store.put_schedule_state(self.epoch(), state)
        self.states[schedule.name] = state
        self.metrics.schedule_runs.labels(schedule.name, state.outcome).inc()
        log.info("schedule %s: occurrence %.0f %s %s", schedule.name, state.last_at,
                 state.outcome, state.txn_id or state.error)
        if state.outcome in ("refused", "missed"):
            self.notify(schedule, {"outcome": state.outcome, "reason": state.error,
                                   "scheduled_at": state.last_at})

    async def _start(self, schedule: Schedule, at: float, now: float) -> ScheduleState:
        """Raises: NotLeaderError, StoreUnavailableError."""
        try:
            record = await self.start(schedule.request(at))
        except (NotLeaderError, StoreUnavailableError):
            raise
        except BlocktxnError as err:  # bad or busy targets, a lost agent: this run is over
            return ScheduleState(schedule.name, at, "refused", "", str(err)[:512], now)
        return ScheduleState(schedule.name, at, "started", record.txn_id, "", now)

    def finished(self, record: TxnRecord) -> None:
        """A transaction this leader drove is done: notify if a schedule started it."""
        name = schedule_of(record.request_id)
        schedule = self.schedules.get(name or "")
        if schedule is None:
            return
        outcome = "commit" if record.decision == Decision.COMMIT else "abort"
        now = time.time()
        self.notify(schedule, {
            "outcome": outcome, "reason": record.reason, "txn_id": record.txn_id,
            "set_id": record.set_id,
            "scheduled_at": float(record.request_id.rsplit("-", 1)[1]),
            "started_at": record.created_at, "finished_at": now,
            "duration_seconds": round(now - record.created_at, 3),
            "freeze_seconds": round(max(0.0, record.thawed_at - record.frozen_from), 3)
            if record.frozen_from else 0.0,
            "members": [{"target": f"{m.agent_id}/{m.vm}/{m.disk}", "mode": m.chosen or m.mode,
                         "outcome": m.outcome} for m in record.members]})

    def notify(self, schedule: Schedule, body: dict[str, Any]) -> None:
        if not schedule.webhook:
            return
        if schedule.notify == "abort" and body["outcome"] == "commit":
            return
        self.notifier.send(schedule.webhook, {"schedule": schedule.name, **body})


def schedule_of(request_id: str) -> str | None:
    """The schedule whose run *request_id* is (None: not a scheduled run)."""
    if not request_id.startswith(PREFIX):
        return None
    name, _, at = request_id[len(PREFIX):].rpartition("-")
    return name if name and at.isdigit() else None
