"""Backup set removals on this host, and their turns with the backups of the same
disks: a removal asked while a transaction holds a disk waits for it to end; a cut of
a disk waits for the removal step under way on it (neither starves the other)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from blocktxn.requests import DiskRequest

from .errors import ConflictError
from .participant_messages import ImageRecord
from .repository import Repository

log = logging.getLogger(__name__)

WAIT_STEP = 0.1  # seconds between looks at a disk another step holds
REMOVAL_WAIT = 30.0  # seconds a cut waits for a set removal's step on one of its disks

Key = tuple[str, str]  # (vm, disk)


class Removals:
    """The removals this agent runs in the background, one per set."""

    def __init__(self, repo: Repository, busy: Callable[[], Mapping[Key, str]],
                 spawn: Callable[[Any], asyncio.Task[None]]) -> None:
        self.repo, self._busy, self._spawn = repo, busy, spawn
        self._tasks: dict[str, asyncio.Task[None]] = {}  # set id -> its removal
        self.pruning: dict[Key, str] = {}  # disk -> the set whose image is being removed
        self._wanted: dict[Key, int] = {}  # disk -> removals waiting for it

    async def forget(self, set_id: str, check_only: bool = False) -> int:
        """Remove this host's images of *set_id* in the background (see the proto's
        ForgetImages); return how many are left (0: done). *check_only*: only raise
        if the removal may not start now.

        Raises:
            ConflictError (a disk being read, a newest image), AgentError (the removal
            failed; asking again retries it). A disk in an open transaction is not
            refused: its removal step waits for the transaction to end, and the next cut
            of the disk waits for that step.
        """
        task = self._tasks.get(set_id)
        if task is None:
            images = [i for i in self.repo.images() if i.set_id == set_id]
            if not images:
                return 0
            for i in images:
                if (i.vm, i.disk) in self.repo.reading:
                    raise ConflictError(f"a restore or verify of {i.vm}/{i.disk} is "
                                        "running: retry when it ends")
                last = self.repo.last_image(i.vm, i.disk)
                if last is not None and last.image == i.image:
                    raise ConflictError(f"backup set {set_id} holds the newest backup of "
                                        f"{i.vm}/{i.disk}: the next incremental builds on it")
            if check_only:
                return len(images)
            task = self._tasks[set_id] = self._spawn(self._remove(set_id, images))
        elif check_only:
            return self._left(set_id)
        left = self._left(set_id)
        if task.done():
            del self._tasks[set_id]
            task.result()  # raises what the removal raised
        return left

    async def before_cut(self, disks: Sequence[DiskRequest]) -> None:
        """A cut waits for the removal step under way on any of its disks (up to
        REMOVAL_WAIT; the planner refuses after), also for one about to start (it waited
        for a transaction before)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REMOVAL_WAIT):
                for d in disks:
                    key = (d.vm, d.disk)
                    while key in self._wanted and key not in self._busy():
                        await asyncio.sleep(WAIT_STEP)
                    if key in self.pruning:
                        async with self.repo.lock(*key):
                            pass

    def _left(self, set_id: str) -> int:
        return sum(1 for i in self.repo.images() if i.set_id == set_id)

    async def _remove(self, set_id: str, images: list[ImageRecord]) -> None:
        for image in images:
            key = (image.vm, image.disk)
            self._wanted[key] = self._wanted.get(key, 0) + 1
            wanted = True
            try:
                while True:
                    while key in self._busy():  # until its transaction ends
                        await asyncio.sleep(WAIT_STEP)
                    async with self.repo.lock(*key):
                        if key in self._busy():
                            continue  # a cut took the disk while the lock was awaited
                        self.pruning[key] = set_id
                        self._drop_wanted(key)
                        wanted = False
                        try:
                            await self.repo.remove(image)
                        finally:
                            del self.pruning[key]
                    break
            finally:
                if wanted:
                    self._drop_wanted(key)
            log.info("set %s: image %s removed", set_id, image.image)

    def _drop_wanted(self, key: Key) -> None:
        n = self._wanted.pop(key, 0) - 1
        if n > 0:
            self._wanted[key] = n
