"""Leader election in etcd: a lease and a create-if-absent leader key. The key's
create revision is the epoch that fences every state write of the leader."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import CoordinatorError, NotLeaderError
from .keepalive import LeaseKeeper
from .store import Store

log = logging.getLogger(__name__)
#: the leader's lease: a replica that dies is replaced within this (a loaded host can
#: delay a keepalive by seconds: the keeper refreshes every quarter of it)
LEASE_TTL = 10
#: the keeper keeps the leader's lease alive this long after the election's loop last
#: asked: a replica whose loop hangs longer loses its leadership (within WANT_S + TTL)
WANT_S = 10.0


class Election:
    """Campaign until elected, keep the lease alive, campaign again when deposed.

    *on_elected* runs once per term before leading starts (recovery);
    *on_deposed* runs when a term ends, however it ends.
    """

    def __init__(self, store: Store, keeper: LeaseKeeper, name: str, identity: str,
                 on_elected: Callable[[], Awaitable[None]],
                 on_deposed: Callable[[], None]) -> None:
        self.store = store
        self.keeper = keeper
        self.name = name
        self.identity = identity  # NAME@ADDRESS, the leader key's value
        self.epoch: int | None = None
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._campaign(), name="election")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._deposed(stopping=True)

    def require(self) -> int:
        """The current epoch.

        Raises:
            NotLeaderError: this replica does not lead.
        """
        if self.epoch is None:
            raise NotLeaderError("this replica is not the leader")
        return self.epoch

    async def leader_address(self) -> str | None:
        """The address the leader advertises, None if no replica leads.

        Raises:
            StoreUnavailableError, StoreCorruptError.
        """
        got = await self.store.leader()
        if got is None:
            return None
        return got[0].partition("@")[2] or None

    async def _campaign(self) -> None:
        while True:
            try:
                lease = await self.store.lease(LEASE_TTL)
                epoch = await self.store.try_lead(self.identity, lease)
                if epoch is None:
                    await asyncio.sleep(0.5)
                    continue
                log.info("%s leads with epoch %d", self.name, epoch)
                self.epoch = epoch
                self._want(lease)
                try:
                    await self._on_elected()
                    await self._keep_leading(lease)
                finally:
                    self.keeper.drop(lease.id)
                log.warning("%s: leader lease lost", self.name)
            except CoordinatorError as err:
                log.warning("%s: election: %s", self.name, err)
            except asyncio.CancelledError:
                self._deposed(stopping=True)
                raise
            except Exception:  # a bug: never keep an epoch without leading
                log.exception("%s: election failed", self.name)
            self._deposed()
            await asyncio.sleep(0.5)

    def _want(self, lease: Any) -> None:
        self.keeper.want(lease.id, LEASE_TTL, time.monotonic() + WANT_S)

    async def _keep_leading(self, lease: Any) -> None:
        """Lead while the keeper keeps the lease alive (it rides out etcd hiccups
        shorter than the lease's TTL); tell it every half second that this loop lives."""
        while self.keeper.alive(lease.id):
            self._want(lease)
            await asyncio.sleep(0.5)

    def _deposed(self, stopping: bool = False) -> None:
        if self.epoch is not None:
            # a replica that stops resigns on purpose: not worth a warning
            (log.info if stopping else log.warning)("%s no longer leads", self.name)
        self.epoch = None
        self._on_deposed()
