"""Removing backup sets across agents, crash-safe, on the leader.

A removal is durable before any file changes: one fenced etcd write stores the
intent (``PruneRecord``) and marks every set in it ``removing`` (from then on the
set is neither listed nor restorable). Then, set by set, oldest first, every agent
that holds an image of the set removes its images (``ForgetImages``: idempotent,
asked again until done; the agent rebases a later image before it deletes one, so
every other set keeps restoring bit-identical); then one fenced write deletes the
set's record and shrinks the intent. A leader, agent or etcd member that dies at any
step leaves the intent in etcd, and the next leader carries it on. So a set is
either fully restorable (listed) or on its way out (unlisted), never half listed.

One worker runs the intents one after another, so two removals never race on a
chain.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable

from .errors import (
    AgentCallError,
    NotFoundError,
    NotLeaderError,
    StoreCorruptError,
    StoreUnavailableError,
)
from .records import BackupSet, PruneRecord
from .registry import AgentRegistry
from .store import Store, retry_while_unavailable

log = logging.getLogger(__name__)

MAX_SETS = 100  # sets in one intent: its write stays one small etcd transaction
KEEP_DONE = 1000  # finished prunes remembered (for callers waiting on them)
RETRY_MAX = 5.0  # seconds between attempts at an agent that cannot remove yet


class Pruner:
    """The leader's queue of removals."""

    def __init__(self, store: Store, registry: AgentRegistry,
                 epoch: Callable[[], int]) -> None:
        self.store = store
        self.registry = registry
        self.epoch = epoch  # raises NotLeaderError when this replica no longer leads
        self._queue: asyncio.Queue[PruneRecord] = asyncio.Queue()
        self._queued: set[str] = set()
        self._done: dict[str, asyncio.Event] = {}
        self._worker: asyncio.Task[None] | None = None
        self.last_error: dict[str, str] = {}  # prune id -> why it is waiting

    # ------------------------------------------------------------ leading
    async def resume(self) -> None:
        """On election: carry on every intent a former leader left.

        Raises:
            StoreUnavailableError, StoreCorruptError.
        """
        self._start()
        for prune in sorted(await self.store.prunes(), key=lambda p: p.created_at):
            self._enqueue(prune)

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
        self._queue = asyncio.Queue()
        self._queued.clear()

    def _start(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._run())

    def _enqueue(self, prune: PruneRecord) -> None:
        if prune.prune_id not in self._queued:
            self._queued.add(prune.prune_id)
            self._event(prune.prune_id)
            self._queue.put_nowait(prune)

    def _event(self, prune_id: str) -> asyncio.Event:
        """The event set when *prune_id* is done (the oldest finished ones are forgotten)."""
        if prune_id not in self._done:
            finished = [p for p, e in self._done.items() if e.is_set()]
            for old in finished[:max(0, len(finished) - KEEP_DONE)]:
                del self._done[old]
            self._done[prune_id] = asyncio.Event()
        return self._done[prune_id]

    # --------------------------------------------------------- operations
    async def submit(self, sets: list[BackupSet], why: str) -> PruneRecord:
        """Make the removal of *sets* durable and queue it.

        Raises:
            NotLeaderError, StoreUnavailableError, StoreRejectedError.
        """
        ordered = sorted(sets, key=lambda s: (s.cut_at, s.set_id))
        prune = PruneRecord(f"p{int(time.time())}-{random.getrandbits(32):08x}",
                            tuple(s.set_id for s in ordered), time.time(), why)
        await self.store.start_prune(self.epoch(), prune, ordered)
        log.info("prune %s (%s): removing %s", prune.prune_id, why, ", ".join(prune.set_ids))
        self._start()
        self._enqueue(prune)
        return prune

    async def wait(self, prune_id: str) -> None:
        """Until every set of *prune_id* is gone (or this replica stops leading)."""
        await self._event(prune_id).wait()

    def done(self, prune_id: str) -> bool:
        event = self._done.get(prune_id)
        return event is not None and event.is_set()

    # ------------------------------------------------------------- worker
    async def _run(self) -> None:
        while True:
            prune = await self._queue.get()
            try:
                await self._drive(prune)
            except NotLeaderError as err:
                log.warning("prune %s: no longer leading: %s", prune.prune_id, err)
                return
            finally:
                self._queued.discard(prune.prune_id)

    async def _drive(self, prune: PruneRecord) -> None:
        left: PruneRecord | None = prune
        for set_id in prune.set_ids:
            assert left is not None
            backup_set = await retry_while_unavailable(
                functools.partial(self.store.get_set, set_id))
            for agent_id in backup_set.agents if backup_set else ():
                await self._forget_on(prune.prune_id, agent_id, set_id)
            left = await retry_while_unavailable(functools.partial(self._removed, left, set_id))
            log.info("prune %s: set %s removed everywhere", prune.prune_id, set_id)
        self.last_error.pop(prune.prune_id, None)
        self._event(prune.prune_id).set()
        log.info("prune %s done: %d sets removed", prune.prune_id, len(prune.set_ids))

    async def _forget_on(self, prune_id: str, agent_id: str, set_id: str) -> None:
        """Ask *agent_id* until its images of *set_id* are gone."""
        delay, last = 0.2, -1
        while True:
            self.epoch()
            try:
                client = await self.registry.owner(agent_id)
                left = await client.forget(set_id)
                if left == 0:
                    return
                # under way: ask again soon; waiting (a backup holds the disk): less often
                delay = 0.2 if left != last else min(RETRY_MAX, delay * 2)
                last = left
            except (AgentCallError, NotFoundError, StoreUnavailableError,
                    StoreCorruptError) as err:
                why = f"{agent_id}: {err}"
                if self.last_error.get(prune_id) != why:
                    log.warning("prune %s: set %s waits: %s", prune_id, set_id, why)
                self.last_error[prune_id] = why
                delay = min(RETRY_MAX, delay * 2)
            await asyncio.sleep(delay)

    async def _removed(self, prune: PruneRecord, set_id: str) -> PruneRecord | None:
        return await self.store.set_removed(self.epoch(), prune, set_id)
