"""The backup repository of one agent: qcow2 images, their catalog, restore, verify.

Layout under the repository root::

    images/<vm>/<disk>/<set_id>.qcow2   one image per disk per backup set
    catalog.jsonl                       the catalog's history (fsync): one line per
                                        committed image, per checksum, per rebase,
                                        per removal
    journal.jsonl                       the participant journal
    libvirt/<vm>/<checkpoint>.xml       a libvirt VM's checkpoints as created (the
                                        libvirt backend redefines one whose metadata
                                        libvirt lost: agent/libvirt/redefine.py)

An incremental image's backing file is the disk's previous image (a relative
name, so a repository can be moved). Image data is only ever read by QEMU
tools, and by the checksum (a worker thread reading the file in 1 MiB chunks:
OpenSSL's SHA-256 through hashlib, several times as fast here as coreutils'
sha256sum, and no child process). The checksum of a new image is taken after the
commit, in the background (``checksums.py``), not on the transaction's path: it
re-reads the whole image, which for a full backup cost a quarter to two fifths of the
barrier again. Until it is recorded, verify checks the image with ``qemu-img check``
alone.

Removing an image that a later image of the chain builds on first rebases that
child onto the removed image's own backing (``qemu-img rebase`` in safe mode,
writethrough: the child's content never changes; see ``_rebase`` for why a rebase cut
short is undone and run again rather than trusted), fsyncs it, records the rebase,
then deletes the file, then records the removal. Each step is idempotent: after a crash the same
removal is asked for again and finishes. Restores, verifies, new images and
removals of one disk hold that disk's lock (qemu-img would refuse to open an image
another one is writing).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from blocktxn import failpoints, procs
from blocktxn.ids import IdentifierError, confine

from . import qcow2
from .aio import gather_all
from .checksums import file_sha256
from .errors import BadRequestError, ConflictError, JournalError, QemuError, UnknownError
from .jsonl import JsonLines, fsync_dir, fsync_file, plain
from .participant_messages import ImageRecord

log = logging.getLogger(__name__)
COMPACT_SLACK = 1000  # catalog lines beyond twice the live images before a rewrite


async def run_tool(*argv: str, timeout: float | None = 600.0) -> str:
    """Run a QEMU tool; return stdout. The child is killed if the caller is cancelled,
    the *timeout* (None: no limit) passes, or the agent dies (a restarted agent redoes
    the step; it must not race a rebase still running from before).

    Raises:
        QemuError: non-zero exit or timeout.
    """
    proc = await asyncio.create_subprocess_exec(
        *procs.DIE_WITH_PARENT, *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError as exc:
        raise QemuError(f"{argv[0]} timed out after {timeout:.0f}s") from exc
    finally:
        if proc.returncode is None:  # timed out or cancelled: never leave it running
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        msg = err.decode(errors="replace").strip().splitlines()
        raise QemuError(f"{argv[0]} failed: {msg[-1] if msg else proc.returncode}")
    return out.decode()


class Repository:
    """Images and catalog under one root; restores confined to given directories."""

    def __init__(self, root: Path, restore_roots: list[Path]) -> None:
        self.root = root.resolve()
        self.restore_roots = [r.resolve() for r in restore_roots]
        self.root.mkdir(parents=True, exist_ok=True)
        self.catalog = JsonLines(self.root / "catalog.jsonl")
        self._records = 0  # lines in the catalog file (compaction once they pile up)
        self._catalog: list[ImageRecord] = []
        self._by_disk: dict[tuple[str, str], list[ImageRecord]] = {}
        self._by_image: dict[str, ImageRecord] = {}
        self._take(self._load())
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.reading: collections.Counter[tuple[str, str]] = collections.Counter()

    def close(self) -> None:
        self.catalog.close()

    # --------------------------------------------------------------- catalog
    def _load(self) -> list[ImageRecord]:
        """Replay the catalog's history. Raises: JournalError for a corrupt catalog."""
        out: dict[str, ImageRecord] = {}
        records = self.catalog.read()
        for number, record in enumerate(records, 1):
            op = record.pop("op", "add")
            try:
                if op == "add":
                    image = ImageRecord(**record)
                    out.setdefault(image.image, image)
                elif op == "rebase" and record["image"] in out:
                    old = out[record["image"]]
                    out[old.image] = dataclasses.replace(
                        old, backing=record["backing"], sha256=record["sha256"],
                        mode=old.mode if record["backing"] else "full")
                elif op == "sum" and record["image"] in out:
                    old = out[record["image"]]
                    out[old.image] = dataclasses.replace(old, sha256=record["sha256"])
                elif op == "remove":
                    out.pop(record["image"], None)
                elif op not in ("rebase", "sum"):
                    raise TypeError(f"unknown op {op!r}")
            except (TypeError, KeyError) as err:
                raise JournalError(f"{self.catalog.path}: record {number} is not a catalog "
                                   f"entry ({err!r})") from err
        self._records = len(records)
        return list(out.values())

    def _take(self, catalog: list[ImageRecord]) -> None:
        """*catalog* as the catalog, with its indexes: per disk (oldest first) and per
        image name. (A scan of the whole catalog per disk made the cut, the inventory
        and the checksums cost O(disks x images): more with every backup kept.)"""
        by_disk: dict[tuple[str, str], list[ImageRecord]] = {}
        for i in catalog:
            by_disk.setdefault((i.vm, i.disk), []).append(i)
        self._catalog, self._by_disk = catalog, by_disk
        self._by_image = {i.image: i for i in catalog}

    def _append(self, records: list[dict[str, Any]], catalog: list[ImageRecord]) -> None:
        """Make *records* durable, then take *catalog* as the catalog (a failed write
        changes nothing, so a retry writes them again)."""
        self.catalog.append(records)
        self._records += len(records)
        self._take(catalog)
        if self._records > 2 * len(self._catalog) + COMPACT_SLACK:
            self.catalog.rewrite(plain(i) for i in self._catalog)
            self._records = len(self._catalog)

    def images(self, vm: str = "", disk: str = "") -> list[ImageRecord]:
        if vm and disk:
            return list(self._by_disk.get((vm, disk), ()))
        return [
            i for i in self._catalog if (not vm or i.vm == vm) and (not disk or i.disk == disk)
        ]

    def last_image(self, vm: str, disk: str) -> ImageRecord | None:
        found = self._by_disk.get((vm, disk))
        return found[-1] if found else None

    def record(self, images: list[ImageRecord]) -> None:
        """Append committed images to the catalog (idempotent, fsync)."""
        new = [i for i in images if not any(
            j.set_id == i.set_id for j in self._by_disk.get((i.vm, i.disk), ()))]
        if not new:
            return
        self._append([plain(i) for i in new], [*self._catalog, *new])

    async def record_sum(self, img: ImageRecord, sha: str) -> bool:
        """Record *img*'s checksum (read without the lock) if the image is still
        catalogued without one and with the same backing; return whether it was."""
        async with self.lock(img.vm, img.disk):
            return self._record_sums([(img, sha)]) == 1

    async def record_sums(self, sums: list[tuple[ImageRecord, str]]) -> int:
        """``record_sum`` of each (image, checksum), in ONE durable append for every
        image whose disk's lock is free now (no await between that look and the append:
        as if each lock were held); the others one by one, each waiting for its lock.
        Return how many were recorded."""
        free = [(i, s) for i, s in sums if not self.lock(i.vm, i.disk).locked()]
        held = [(i, s) for i, s in sums if self.lock(i.vm, i.disk).locked()]
        done = self._record_sums(free)
        for img, sha in held:
            done += await self.record_sum(img, sha)
        return done

    def _record_sums(self, sums: list[tuple[ImageRecord, str]]) -> int:
        fresh: dict[str, str] = {}
        for img, sha in sums:
            now = self._by_image.get(img.image)
            if now is None or now.sha256 or now.backing != img.backing:
                continue  # removed or rebased meanwhile (a rebase records its own)
            fresh[img.image] = sha
        if fresh:
            self._append([{"op": "sum", "image": i, "sha256": s} for i, s in fresh.items()],
                         [dataclasses.replace(i, sha256=fresh[i.image]) if i.image in fresh
                          else i for i in self._catalog])
        return len(fresh)

    def space(self) -> tuple[int, int]:
        """(capacity, free) bytes of the repository's file system."""
        usage = shutil.disk_usage(self.root)
        return usage.total, usage.free

    def chain_length(self, vm: str, disk: str) -> int:
        """Images a restore of the disk's newest image opens (0: no image)."""
        last = self.last_image(vm, disk)
        return len(self.chain(last.set_id, vm, disk)) if last else 0

    def lock(self, vm: str, disk: str) -> asyncio.Lock:
        """The disk's lock: restore, verify, new image and removal take turns."""
        return self._locks.setdefault((vm, disk), asyncio.Lock())

    @contextlib.asynccontextmanager
    async def _read(self, vm: str, disk: str) -> AsyncIterator[None]:
        """A restore or verify reading the disk's images (``reading`` counts them, so
        that a removal asked for meanwhile is refused until they end)."""
        self.reading[(vm, disk)] += 1
        try:
            async with self.lock(vm, disk):
                yield
        finally:
            self.reading[(vm, disk)] -= 1
            if not self.reading[(vm, disk)]:
                del self.reading[(vm, disk)]

    def chain(self, set_id: str, vm: str, disk: str) -> list[ImageRecord]:
        """The images a restore of (*set_id*, *vm*, *disk*) needs, base first.

        Raises:
            UnknownError: no such image in the catalog.
        """
        by_image = {i.image: i for i in self.images(vm, disk)}
        top = next((i for i in by_image.values() if i.set_id == set_id), None)
        if top is None:
            raise UnknownError(f"backup set {set_id} has no image of {vm}/{disk} on this agent")
        chain = [top]
        while chain[-1].backing:
            prev = by_image.get(chain[-1].backing)
            if prev is None:
                raise UnknownError(f"chain of {vm}/{disk} broken at {chain[-1].backing}")
            chain.append(prev)
        return list(reversed(chain))

    # ---------------------------------------------------------------- images
    def image_rel(self, vm: str, disk: str, set_id: str) -> str:
        return f"images/{vm}/{disk}/{set_id}.qcow2"

    def path(self, rel: str) -> Path:
        return self.root / rel

    async def create_image(self, vm: str, disk: str, rel: str, size: int,
                           backing_rel: str) -> None:
        """Create an empty qcow2 target (with the previous image as backing)."""
        async with self.lock(vm, disk):
            await self._create_image(rel, size, backing_rel)

    async def _create_image(self, rel: str, size: int, backing_rel: str) -> None:
        p = self.path(rel)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise QemuError(f"repository: cannot create {p.parent}: {err}") from err
        await failpoints.pause("agent_create_image")
        backing = Path(backing_rel).name if backing_rel else ""
        try:  # in-process: what qemu-img create -u writes, without a process per disk
            qcow2.create(p, size, backing)
            return
        except qcow2.Unsupported:
            pass
        except OSError as err:
            raise QemuError(f"repository: cannot create {p}: {err}") from err
        argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if backing:  # -u: only the name is written; without it qemu-img opens the
            # whole backing chain (time grows with every earlier backup of the disk)
            argv += ["-u", "-b", backing, "-F", "qcow2"]
        await run_tool(*argv, str(p), str(size), timeout=60)

    async def remove(self, image: ImageRecord) -> None:
        """Remove one committed image from the repository without changing what any
        other image restores to (see the module's docstring); idempotent. The caller
        holds the disk's lock and made sure no open transaction uses the disk."""
        if not any(i.image == image.image for i in self._catalog):
            self.delete_image(image.image)  # a removal recorded, the file already gone
            return
        child = next((i for i in self._catalog if i.backing == image.image), None)
        if child is not None:
            await self._rebase(child, image.backing)
            failpoints.hit("agent_after_rebase")
        self.delete_image(image.image)
        failpoints.hit("agent_after_delete")
        self._append([{"op": "remove", "image": image.image}],
                     [i for i in self._catalog if i.image != image.image])

    async def _rebase(self, child: ImageRecord, backing: str) -> None:
        """Make *child* stand on *backing* ("" : on nothing) with the same content.

        qemu-img's safe rebase with its default cache writes the new backing name into
        the header before the copied clusters are durable; cut short there, the child
        names its new backing with data missing, and the same rebase run again finds
        nothing to do. So the header is never trusted: until the catalog records the
        rebase, the old backing is put back (header only: the old chain is intact, so
        that restores the old content exactly) and the rebase runs again, writethrough
        (clusters and their tables durable before the header changes). A rebase done
        before is cheap to repeat: clusters already copied are skipped."""
        p = str(self.path(child.image))
        old = Path(child.backing).name if child.backing else ""
        new = Path(backing).name if backing else ""
        await run_tool("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", old,
                       *(["-F", "qcow2"] if old else []), p, timeout=60)
        await run_tool("qemu-img", "rebase", "-t", "writethrough", "-f", "qcow2", "-b", new,
                       *(["-F", "qcow2"] if new else []), p, timeout=None)
        await self.make_durable([child.image])
        sha = await self.sha256(child.image)
        self._append([{"op": "rebase", "image": child.image, "backing": backing,
                       "sha256": sha}],
                     [dataclasses.replace(i, backing=backing, sha256=sha,
                                          mode=i.mode if backing else "full")
                      if i.image == child.image else i for i in self._catalog])

    def delete_image(self, rel: str) -> None:
        p = self.path(rel)
        if p.exists():
            p.unlink()
            fsync_dir(p.parent)

    async def make_durable(self, rels: list[str]) -> None:
        """fsync every image, then its directory; the files at once (worker threads:
        concurrent fsyncs share the file system's journal commits)."""
        try:  # gather_all: a failure waits for the fsyncs still running
            await gather_all(*(asyncio.to_thread(fsync_file, self.path(r)) for r in rels))
            await gather_all(*(asyncio.to_thread(fsync_dir, d)
                               for d in {self.path(r).parent for r in rels}))
        except OSError as err:
            raise QemuError(f"repository: cannot make the images durable: {err}") from err

    async def sha256(self, rel: str) -> str:
        """The image's checksum, read in a worker thread (no time limit: its size has
        none; the thread stops within one chunk if the caller gives up).

        Raises:
            QemuError: the image cannot be read.
        """
        return await file_sha256(self.path(rel))

    # -------------------------------------------------------- restore/verify
    async def restore(self, set_id: str, vm: str, disk: str, dest: str, fmt: str) -> Path:
        """Write the disk as of *set_id* to *dest* (raw or qcow2).

        Raises:
            BadRequestError: bad format or a destination outside the restore roots.
            ConflictError: the destination exists. UnknownError: no such image.
        """
        if fmt not in ("raw", "qcow2"):
            raise BadRequestError(f"format {fmt!r} is not raw or qcow2")
        try:
            target = confine(dest, self.restore_roots, "restore destination")
        except IdentifierError as err:
            raise BadRequestError(str(err)) from err
        if target.exists() or target.is_symlink():
            raise ConflictError(f"restore destination {target} already exists")
        async with self._read(vm, disk):
            return await self._restore(set_id, vm, disk, target, fmt)

    async def _restore(self, set_id: str, vm: str, disk: str, target: Path, fmt: str
                       ) -> Path:
        chain = self.chain(set_id, vm, disk)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A private directory of our own (mkdtemp: created anew, mode 0700), so nothing
        # planted in the restore directory can redirect the write; link() then puts the
        # result in place only if the name is still free.
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            tmp = work / "image"
            await run_tool("qemu-img", "convert", "-O", fmt, str(self.path(chain[-1].image)),
                           str(tmp), timeout=None)
            try:
                os.link(tmp, target)
            except FileExistsError as err:
                raise ConflictError(f"restore destination {target} already exists") from err
            fsync_dir(target.parent)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return target

    async def verify(self, set_id: str) -> list[tuple[str, bool, str]]:
        """(image, ok, problem) for every image of every chain of *set_id*.

        Raises:
            UnknownError: the set has no image on this agent.
        """
        tops = [i for i in self._catalog if i.set_id == set_id]
        if not tops:
            raise UnknownError(f"backup set {set_id} has no image on this agent")
        seen: dict[str, tuple[str, bool, str]] = {}
        for top in tops:
            async with self._read(top.vm, top.disk):
                for img in self.chain(set_id, top.vm, top.disk):
                    if img.image not in seen:
                        seen[img.image] = (img.image, *await self._check(img))
        return list(seen.values())

    async def _check(self, img: ImageRecord) -> tuple[bool, str]:
        p = self.path(img.image)
        if not p.exists():
            return False, "image file missing"
        try:
            await run_tool("qemu-img", "check", "-q", "-f", "qcow2", str(p))
        except QemuError as err:
            return False, str(err)
        if img.sha256 and await self.sha256(img.image) != img.sha256:
            return False, "checksum mismatch"
        return True, ""
