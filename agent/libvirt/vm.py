"""The libvirt backend: one libvirt domain, backed up through libvirt's checkpoint and
backup API (never QMP passthrough), quiesced through libvirt, with a watchdog process
that thaws or resumes it through libvirt at its deadline.

The checkpoint scheme (DESIGN.md, "Facts verified on libvirt 9.0"): the cut is ONE
push-mode ``backupBegin`` per domain that creates checkpoint NEW atomically with the
point in time and copies every member (full, or incremental from its own OLD) into
the target images the repository created (``REUSE_EXTERNAL``: libvirt keeps their
header, so an incremental's backing file is already the previous backup image, not
the live disk). A checkpoint is never consumed by a backup. The barrier is "job
completed" (libvirt has then written and closed every target; the runner fsyncs
them). Commit deletes OLD, abort ends the job and deletes NEW. A libvirt checkpoint
spans every disk of its cut: it is deleted once every one of its disks dropped it.
Every checkpoint the agent creates is also recorded in the repository, so that one
whose libvirt metadata was lost is redefined when the disks are next read
(``redefine.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import libvirt

from blocktxn import failpoints

from ..backend import CHECKPOINT_PREFIX, Checkpoint, Disk, JobProgress, VmBackend
from ..errors import AgentError, AgentTimeoutError, ConflictError, QemuError
from ..participant_messages import MemberPlan
from ..watchdog_proc import WatchdogHandle
from . import checkpoints as ckpts
from . import domxml, jobs
from .conn import DomainConnection
from .jobs import BackupJob
from .redefine import CheckpointRecords, redefine_missing, redefine_xml
from .watchdog import claim_key as watchdog_claim_key

log = logging.getLogger(__name__)
WATCHDOG_MODULE = "blocktxn.agent.libvirt.watchdog"
SAFETY_POLL = 1.0  # seconds: a missed job event is noticed by asking libvirt this often
END_TIMEOUT = 60.0  # seconds an aborted job may take to end
FRESH = 2.0  # seconds the disks read for a cut's plan stand for its stage


class LibvirtVm(VmBackend):
    """A libvirt domain (``--vm NAME=libvirt:DOMAIN``, ``--libvirt-uri URI``)."""

    def __init__(self, name: str, uri: str, domain: str, timeout: float,
                 repo_root: Path) -> None:
        super().__init__(name)
        self.uri = uri
        self.domain = domain
        self.repo_images = (repo_root / "images").resolve()
        self.records = CheckpointRecords(repo_root.resolve() / "libvirt" / name)
        self.conn = DomainConnection(name, uri, domain, timeout)
        self.conn.on_lost = self._lost
        self.conn.on_connected = self._connected
        self.conn.before_connected = self._ready
        self.conn.on_job_completed = self._job_completed
        self.watchdog = WatchdogHandle(name)
        self._facts: domxml.DomainFacts | None = None
        self._seen: tuple[float, dict[str, Disk]] = (0.0, {})  # the last disks(), when
        self._job_lock = asyncio.Lock()  # begin, abort and job queries take turns
        self._job: BackupJob | None = None
        self._connected_before = False  # a completed job is adopted at the first connect only
        self._staged: dict[tuple[str, str], tuple[Path, int]] = {}  # key -> (target, total)
        self._released: dict[str, set[str]] = {}  # libvirt checkpoint -> disks done with it

    async def _lost(self) -> None:
        self.watchdog.renew()
        job = self._job
        if job is not None and not job.done.is_set():
            job.error = f"libvirt domain {self.domain} stopped or unreachable"
            job.done.set()
        if self.on_lost:
            await self.on_lost(self)

    async def _ready(self) -> None:
        """Before the domain counts as connected: read its definition (disks, guest
        agent) and follow a backup job of ours it still has."""
        self.watchdog.renew()
        try:
            await self._domain()
            await self._adopt_job()
        except AgentError as err:
            log.warning("VM %s: reading the domain after connecting: %s", self.name, err)

    async def _connected(self) -> None:
        if self.on_connected:
            await self.on_connected(self)

    # ------------------------------------------------------------ lifecycle
    @property
    def connected(self) -> bool:
        return self.conn.connected

    def start(self) -> None:
        self.conn.start()

    async def stop(self) -> None:
        """Disconnect; an armed watchdog is left to end its quiesce (see QemuVm.stop)."""
        self.watchdog.stop()
        await self.conn.stop()

    async def wait_connected(self, timeout: float) -> bool:
        return await self.conn.wait_connected(timeout)

    # ------------------------------------------------------------ inventory
    async def _domain(self) -> domxml.DomainFacts:
        dom = self.conn.dom
        self._facts = domxml.parse_domain(await self.conn.call("domain XML", dom.XMLDesc, 0))
        return self._facts

    async def disks(self) -> dict[str, Disk]:
        dom = self.conn.dom
        facts = await self._domain()
        found: dict[str, list[Checkpoint]] = {d.target: [] for d in facts.disks}
        listed = await self.conn.call("checkpoint list", dom.listAllCheckpoints, 0)
        if await redefine_missing(self.conn, self.records, [c.getName() for c in listed]):
            listed = await self.conn.call("checkpoint list", dom.listAllCheckpoints, 0)
        for ckpt in listed:
            name = domxml.from_libvirt(ckpt.getName())
            for disk, size in (await ckpts.sizes(self.conn, ckpt)).items():
                if disk in found:  # no size: QEMU lost the bitmap (killed before storing it)
                    found[disk].append(Checkpoint(name, recording=True, persistent=True,
                                                  inconsistent=size is None, count=size or 0))
        out = {}
        for d in facts.disks:
            capacity, allocation, _ = await self.conn.call("block info", dom.blockInfo,
                                                           d.target, 0)
            out[d.target] = Disk(d.target, int(capacity), d.format, tuple(found[d.target]),
                                 allocated=int(allocation))
        self._seen = (time.monotonic(), out)
        return out

    def job_ids(self) -> set[str]:
        return set(self._job.members) if self._job is not None else set()

    async def progress(self) -> Mapping[str, JobProgress]:
        """Every member of the domain's one job: ``running``, then ``pending`` once
        libvirt completed it (copied, nothing decided: QEMU's word for that state) or
        ``concluded`` with the error if it failed."""
        job = self._job
        if job is None:
            return {}
        if not job.done.is_set():
            await self._poll_job(job)
        status = ("running" if not job.done.is_set()
                  else "concluded" if job.error else "pending")
        share = job.processed / job.total if job.total and not job.done.is_set() else 1.0
        return {jid: JobProgress(jid, status, int(total * share) if not job.error else 0,
                                 total, job.error)
                for jid, (_, total) in job.members.items()}

    @property
    def can_freeze(self) -> bool:
        return self._facts is not None and self._facts.guest_agent

    async def pause_problem(self) -> str:
        return ""  # libvirt suspends any domain, and the watchdog resumes it through libvirt

    # -------------------------------------------------------------- quiesce
    async def freeze_prepare(self, quiesce: str) -> None:
        await self.watchdog.prepare(WATCHDOG_MODULE, [
            "--uri", self.uri, "--domain", self.domain, f"--{quiesce}"],
            watchdog_claim_key(self.uri, self.domain))

    async def freeze_ready(self) -> None:
        await self.watchdog.ready()

    async def freeze_abandon(self) -> None:
        """Nothing to undo: the watchdog stays, unarmed, for the next freeze."""

    async def freeze(self, quiesce: str, deadline: float) -> None:
        dom = self.conn.dom
        await self.watchdog.arm(deadline)
        if quiesce == "freeze":
            await self.conn.call("guest filesystem freeze", dom.fsFreeze, None, 0)
        elif quiesce == "pause":
            await self.conn.call("suspend", dom.suspend)

    async def thaw(self, quiesce: str) -> None:
        """Thaw; only a thaw that worked disarms the watchdog."""
        dom = self.conn.dom
        if quiesce == "freeze":
            await self.conn.call("guest filesystem thaw", dom.fsThaw, None, 0)
        elif quiesce == "pause":
            state, _ = await self.conn.call("domain state", dom.state, 0)
            if state == libvirt.VIR_DOMAIN_PAUSED:
                await self.conn.call("resume", dom.resume)
        await self.watchdog.disarm()

    # ------------------------------------------------------------- the jobs
    async def attach_targets(self, members: Sequence[MemberPlan],
                             path_of: Callable[[str], Path]) -> None:
        """Before the freeze: check every member can be backed up by libvirt (a qcow2
        disk, no job running on the domain) and note what each will copy."""
        at, disks = self._seen  # the planner read them for this cut just before
        if time.monotonic() - at > FRESH:
            disks = await self.disks()
        for m in members:
            disk = disks.get(m.disk)
            if disk is None:
                raise QemuError(f"VM {self.name}: libvirt domain {self.domain} has no "
                                f"disk {m.disk}")
            if disk.format != "qcow2":
                raise QemuError(f"VM {self.name}: disk {m.disk} is {disk.format}; libvirt "
                                f"checkpoints need qcow2")
        broken = {c.name for d in disks.values() for c in d.checkpoints
                  if c.inconsistent and c.name.startswith(CHECKPOINT_PREFIX)}
        await ckpts.delete_broken(self.conn, broken, self.records)
        job_type = (await self.conn.call("job info", self.conn.dom.jobInfo))[0]
        if job_type != libvirt.VIR_DOMAIN_JOB_NONE or (
                self._job is not None and not self._job.done.is_set()):
            raise ConflictError(f"VM {self.name}: a job is already running on libvirt "
                                f"domain {self.domain}")
        for m in members:
            old = disks[m.disk].checkpoint(m.sync_bitmap) if m.sync_bitmap else None
            total = old.count if old is not None else disks[m.disk].allocated
            self._staged[m.key] = (path_of(m.image).resolve(), total)

    async def start_jobs(self, members: Sequence[MemberPlan]) -> None:
        """ONE backupBegin: checkpoint NEW on the members' disks and every member's copy."""
        facts = self._facts
        assert facts is not None and members
        new = {m.new_bitmap for m in members}
        assert len(new) == 1, new
        all_disks = [d.target for d in facts.disks]
        staged = {m.key: self._staged.pop(m.key) for m in members}
        backup = domxml.backup_xml([domxml.BackupDisk(
            m.disk, str(staged[m.key][0]),
            domxml.to_libvirt(m.sync_bitmap) if m.mode == "incremental" and m.sync_bitmap
            else None) for m in members], all_disks)
        lv_new = domxml.to_libvirt(new.pop())
        checkpoint = domxml.checkpoint_xml(lv_new, [m.disk for m in members], all_disks)
        if any(m.speed for m in members):
            log.warning("VM %s: libvirt's backup has no speed limit: the copy runs unlimited",
                        self.name)
        job = BackupJob({m.job_id: (m.disk, staged[m.key][1]) for m in members})
        self.records.save(lv_new, redefine_xml(checkpoint, int(time.time())))
        await failpoints.pause("agent_backup_begin")  # tests: the targets exist, no job yet
        async with self._job_lock:
            self._job = job
            try:
                await self.conn.call("backup begin", self.conn.dom.backupBegin, backup,
                                     checkpoint, libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
            except AgentError:
                self._job = None
                raise

    async def wait_copied(self, members: Sequence[MemberPlan], timeout: float | None) -> None:
        """Wait until the domain's job completed (push mode: every target written).

        Raises:
            QemuError: the job failed or vanished. AgentTimeoutError: not in time.
        """
        job = self._job
        if job is None or any(m.job_id not in job.members for m in members):
            raise QemuError(f"VM {self.name}: backup job vanished (libvirt domain "
                            f"{self.domain} restarted?)")
        loop = asyncio.get_running_loop()
        until = None if timeout is None else loop.time() + timeout
        while not job.done.is_set():
            tick = SAFETY_POLL if until is None else min(SAFETY_POLL, until - loop.time())
            if tick <= 0:
                raise AgentTimeoutError(f"VM {self.name}: backup not copied within "
                                        f"{timeout:g}s")
            try:
                await asyncio.wait_for(job.done.wait(), tick)
            except TimeoutError:
                await self._poll_job(job)
        if job.error:
            raise QemuError(f"VM {self.name}: backup job of "
                            f"{', '.join(sorted(d for d, _ in job.members.values()))} "
                            f"failed: {job.error}")

    async def close_targets(self, members: Sequence[MemberPlan]) -> dict[tuple[str, str], int]:
        """libvirt closed the targets when the job completed: forget the job."""
        job = self._job
        out = {}
        for m in members:
            out[m.key] = job.members.pop(m.job_id, ("", 0))[1] if job is not None else 0
        if job is not None and not job.members:
            self._job = None
        return out

    async def rollback_jobs(self, members: Sequence[MemberPlan]) -> None:
        """End the job if it still runs (libvirt then stops writing the targets)."""
        for m in members:
            self._staged.pop(m.key, None)
        job = self._job
        if job is None or not any(m.job_id in job.members for m in members):
            return
        if not job.done.is_set() and self.connected:
            async with self._job_lock:
                try:
                    await self.conn.call("abort job", self.conn.dom.abortJob)
                    await asyncio.wait_for(job.done.wait(), END_TIMEOUT)
                    await self._wait_no_job()
                except (AgentError, TimeoutError) as err:
                    log.warning("VM %s: ending the backup job: %s", self.name, err)
                    await jobs.poll(self.conn, job)
        for m in members:
            job.members.pop(m.job_id, None)
        if not job.members or job.done.is_set():
            self._job = None

    # ----------------------------------------------------- commit and abort
    async def drop_checkpoints(self, checkpoints: Sequence[tuple[str, str]]) -> None:
        """Drop (disk, checkpoint) pairs: a libvirt checkpoint goes once every disk it
        has a bitmap on has dropped it (here or earlier in this process)."""
        if not checkpoints:
            return
        if not self.connected:
            log.warning("VM %s lost: checkpoints %s left for later cleanup", self.name,
                        list(checkpoints))
            return
        by_name: dict[str, set[str]] = {}
        for disk, name in checkpoints:
            by_name.setdefault(domxml.to_libvirt(name), set()).add(disk)
        dom = self.conn.dom
        try:
            existing = {c.getName(): c for c in await self.conn.call(
                "checkpoint list", dom.listAllCheckpoints, 0)}
            for name, disks in by_name.items():
                ckpt = existing.get(name)
                if ckpt is None:
                    self._released.pop(name, None)
                    continue
                released = self._released.setdefault(name, set())
                released |= disks
                if domxml.checkpoint_disks(await self.conn.call(
                        "checkpoint XML", ckpt.getXMLDesc, 0)) <= released:
                    await ckpts.delete(self.conn, ckpt, self.records)
                    self._released.pop(name, None)
        except AgentError as err:
            if self.connected:
                raise
            log.warning("VM %s lost while dropping checkpoints: %s", self.name, err)

    # ------------------------------------------------------------- leftovers
    async def sweep(self, keep_jobs: set[str], keep_nodes: set[str],
                    keep_checkpoints: dict[str, set[str]]) -> list[str]:
        """End a backup job of ours no open transaction owns; delete every checkpoint of
        ours none of whose disks keeps it."""
        gone: list[str] = []
        dom = self.conn.dom
        async with self._job_lock:  # a job this process follows is ended by its own rollback
            ours = await self._running_job_ids() if self._job is None else set()
            if ours and not ours & keep_jobs:
                await self.conn.call("abort job", dom.abortJob)
                await self._wait_no_job()
                gone.append(f"backup job writing {len(ours)} targets")
        for ckpt in await self.conn.call("checkpoint list", dom.listAllCheckpoints, 0):
            lv_name = ckpt.getName()
            name = domxml.from_libvirt(lv_name)
            if name == lv_name:
                continue  # not ours
            disks = domxml.checkpoint_disks(await self.conn.call(
                "checkpoint XML", ckpt.getXMLDesc, 0))
            if not any(name in keep_checkpoints.get(d, set()) for d in disks):
                await ckpts.delete(self.conn, ckpt, self.records)
                self._released.pop(lv_name, None)
                gone.append(f"checkpoint {name}")
        return gone

    # ------------------------------------------------------------- helpers
    def _job_completed(self, params: dict[str, Any]) -> None:
        """libvirt's job-completed event (on the loop)."""
        job = self._job
        if (job is not None and not job.done.is_set()
                and params.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP):
            jobs.finish(job, params)

    async def _poll_job(self, job: BackupJob) -> None:
        """Progress or a missed end; not while a job is begun or ended. (libvirtd 9.0
        segfaulted once in these tests while job calls on one domain overlapped; the
        cause is not pinned down, so begin, abort and job queries take turns.)"""
        if self.connected and not self._job_lock.locked():
            async with self._job_lock:
                await jobs.poll(self.conn, job)

    async def _wait_no_job(self) -> None:
        """Until libvirt has torn the domain's job down (after its end or abort)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + END_TIMEOUT
        while (await self.conn.call("job info", self.conn.dom.jobInfo))[0] != (
                libvirt.VIR_DOMAIN_JOB_NONE):
            if loop.time() > until:
                raise AgentTimeoutError(f"VM {self.name}: backup job did not end")
            await asyncio.sleep(0.02)

    async def _running_job_ids(self) -> set[str]:
        return await jobs.running_job_ids(self.conn, self.repo_images / self.name, self.name)

    async def _adopt_job(self) -> None:
        """After a (re)connect: a backup job of ours still running is followed again; one
        that completed while this agent process was not running is taken as copied."""
        first, self._connected_before = not self._connected_before, True
        if self._job is not None:
            return
        async with self._job_lock:
            await self._adopt_job_locked(first)

    async def _adopt_job_locked(self, first: bool) -> None:
        ids = await self._running_job_ids()
        if ids:
            self._job = BackupJob(dict.fromkeys(ids, ("", 0)))
            return
        if not first:
            return  # a job that ended while this process was connected was seen ending
        ids = await jobs.completed_job_ids(self.conn, self.name)
        if ids:
            self._job = BackupJob(dict.fromkeys(ids, ("", 0)))
            self._job.done.set()
            log.info("VM %s: backup job of %d disks completed while the agent was away",
                     self.name, len(ids))
