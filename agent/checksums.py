"""Image checksums: SHA-256 of a file in a worker thread, and the agent's background
task that takes the checksum of each newly committed image after the commit (it
re-reads the whole image, which for a full backup cost a third of the barrier again;
nothing on a transaction's path waits for it). Verify checks a checksum once it is
recorded in the catalog (``qemu-img check`` alone before)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import qcow2
from .errors import AgentError, QemuError

if TYPE_CHECKING:
    from .participant_messages import ImageRecord
    from .repository import Repository

log = logging.getLogger(__name__)
HASH_CHUNK = 1 << 20
RECORD_EVERY = 1.0  # s of hashing whose sums are recorded together at most


async def file_sha256(path: Path) -> str:
    """SHA-256 of a file in a worker thread (hashlib releases the GIL while it hashes);
    a cancelled caller stops the thread at its next chunk.

    Raises:
        QemuError: the file cannot be read.
    """
    stop = threading.Event()

    def work() -> str:
        digest, buf = hashlib.sha256(), bytearray(HASH_CHUNK)
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                if stop.is_set():
                    return ""
                digest.update(view[:n])
        return digest.hexdigest()

    try:
        return await asyncio.get_running_loop().run_in_executor(None, work)
    except OSError as err:
        raise QemuError(f"checksum of {path.name}: {err}") from err
    finally:
        stop.set()


class Checksums:
    """The checksums of a repository's new images, taken in the background."""

    def __init__(self, repo: Repository,
                 spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]]) -> None:
        self.repo, self._spawn = repo, spawn
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def soon(self) -> None:
        """Take the missing checksums in the background, one task at a time."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = self._spawn(self._run())

    async def _run(self) -> None:
        again = True
        while again:
            self._again = False
            try:
                await self.fill()
            except AgentError as err:  # left for the next commit or restart to retry
                log.warning("image checksums not taken: %s", err)
                return
            again = self._again

    async def fill(self) -> int:
        """Checksum every catalogued image that has none yet (oldest first); return how
        many. The image is read without the disk's lock (a backup of the disk must not
        wait for it); the sum is recorded only if the image is still catalogued without
        one and with the same backing (Repository.record_sum), and never for an image
        whose header names another backing than the catalog (a rebase cut short by a
        crash, which its removal redoes). An image that cannot be read is logged and
        left for the next call (verify reports it). The sums of one pass over the
        images without one are recorded together (``Repository.record_sums``)."""
        done, skipped = 0, set()
        while todo := [i for i in self.repo.images() if not i.sha256
                       and i.image not in skipped]:
            sums: list[tuple[ImageRecord, str]] = []
            since = time.monotonic()
            for img in todo:  # (images committed meanwhile: the next pass)
                if sums and time.monotonic() - since > RECORD_EVERY:  # big images
                    done += await self.repo.record_sums(sums)
                    sums, since = [], time.monotonic()
                skipped.add(img.image)  # once per call, whatever happens
                try:
                    named = qcow2.backing_name(self.repo.path(img.image))
                    sha = await self.repo.sha256(img.image)
                except (QemuError, OSError, ValueError) as err:
                    log.warning("no checksum for %s: %s", img.image, err)
                    continue
                if named != (Path(img.backing).name if img.backing else ""):
                    log.warning("no checksum for %s: its header names backing %r, the "
                                "catalog %r (a rebase cut short; its removal redoes it)",
                                img.image, named, img.backing)
                    continue
                sums.append((img, sha))
            # one catalog append (one fsync) for the pass (or RECORD_EVERY s of it), not
            # one per image
            done += await self.repo.record_sums(sums)
        return done
