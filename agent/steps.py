"""The participant's commands carried out: one coroutine per command (cut, barrier,
publish, rollback) over the VM backends and the repository; each returns the event
that reports its outcome. QMP and file formats stay behind the backend and the
repository."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from .aio import gather_all
from .backend import VmBackend
from .errors import AgentError
from .freeze import FreezeControl
from .participant_messages import (
    Aborted,
    Committed,
    CutDone,
    CutFailed,
    Event,
    FinalizeJobs,
    ImageRecord,
    MemberPlan,
    Prepared,
    Rollback,
    Staged,
    TxnPlan,
    VotedNo,
)
from .repository import Repository

log = logging.getLogger(__name__)


def by_vm(members: tuple[MemberPlan, ...]) -> dict[str, list[MemberPlan]]:
    out: dict[str, list[MemberPlan]] = {}
    for m in members:
        out.setdefault(m.vm, []).append(m)
    return out


class Steps:
    """Executes StartCut, FinalizeJobs, Publish and Rollback for one agent."""

    def __init__(self, backends: Mapping[str, VmBackend], repo: Repository,
                 freeze: FreezeControl) -> None:
        self.backends = backends
        self.repo = repo
        self.freeze = freeze

    async def stage(self, plan: TxnPlan) -> Event:
        """Everything before the freeze: create and open the targets, start and ready
        the freeze safety net (its start-up is not in the window). Staged or CutFailed."""
        members = by_vm(plan.members)
        try:
            if plan.quiesce != "none":  # started now, armed just before each freeze
                await self.freeze.prepare(list(members), plan.quiesce)
            await gather_all(
                *(self.repo.create_image(m.vm, m.disk, m.image, m.size, m.backing)
                  for m in plan.members))
            await gather_all(*(self.backends[vm].attach_targets(ms, self.repo.path)
                               for vm, ms in members.items()))
            if plan.quiesce != "none":
                await self.freeze.ready(list(members))
        except AgentError as err:
            log.warning("txn %s: cut failed while staging: %s", plan.txn_id, err)
            return CutFailed(str(err))
        return Staged()

    async def cut(self, plan: TxnPlan) -> Event:
        """The freeze window (the targets are staged): per VM, quiesce and start every
        job in one atomic step, all within the freeze timeout. CutDone or CutFailed."""
        members = by_vm(plan.members)
        try:
            frozen_at = time.time()
            deadline = frozen_at + plan.freeze_timeout

            async def cut_vm(vm: str, ms: list[MemberPlan]) -> None:
                await self.freeze.freeze(plan.txn_id, vm, plan.quiesce, deadline)
                await self.backends[vm].start_jobs(ms)
                log.info("txn %s: vm %s cut (%s): %s", plan.txn_id, vm, plan.quiesce,
                         ", ".join(f"{m.disk} {m.mode} ({m.mode_reason})" for m in ms))

            await asyncio.wait_for(gather_all(*(cut_vm(vm, ms) for vm, ms in members.items())),
                                   plan.freeze_timeout)
            cut_at = time.time()
            progress = await gather_all(*(self.backends[vm].progress() for vm in members))
            totals = [(vm, m.disk, jobs[m.job_id].total if m.job_id in jobs else 0)
                      for (vm, ms), jobs in zip(members.items(), progress, strict=True)
                      for m in ms]
            return CutDone(0.0 if plan.quiesce == "none" else frozen_at, cut_at, deadline,
                           tuple(totals))
        except TimeoutError:
            why = f"cut did not finish within the freeze timeout ({plan.freeze_timeout:g}s)"
            log.warning("txn %s: cut failed: %s", plan.txn_id, why)
            return CutFailed(why)
        except AgentError as err:
            log.warning("txn %s: cut failed: %s", plan.txn_id, err)
            return CutFailed(str(err))

    async def barrier(self, cmd: FinalizeJobs, cut_at: float) -> Event:
        """prepare_to_complete: every job copied, every target closed and fsynced.
        Prepared (vote YES) or VotedNo. Grouped, any failure is a NO; individual, each
        disk on its own: the failed ones are rolled back and left out of the vote."""
        txn_id = cmd.txn_id
        if not cmd.individual:
            try:
                every = await self._prepare(txn_id, cmd.members, cut_at, cmd.timeout)
            except AgentError as err:
                log.warning("txn %s: votes NO: %s", txn_id, err)
                return VotedNo(str(err))
            return self._yes(txn_id, every)
        known = {(vm, disk): why for vm, disk, why in cmd.failed}
        trying = [m for m in cmd.members if m.key not in known]
        results = await asyncio.gather(
            *(self._prepare(txn_id, (m,), cut_at, cmd.timeout) for m in trying),
            return_exceptions=True)
        images: list[ImageRecord] = []
        for m, res in zip(trying, results, strict=True):
            if isinstance(res, AgentError):
                known[m.key] = str(res)
            elif isinstance(res, BaseException):
                raise res
            else:
                images += res
        left_out = tuple((vm, disk, why) for (vm, disk), why in sorted(known.items()))
        if not images:
            why = "; ".join(f"{vm}/{disk}: {w}" for vm, disk, w in left_out)
            log.warning("txn %s: votes NO: every disk failed: %s", txn_id, why)
            return VotedNo(why)
        failed = tuple(m for m in cmd.members if m.key in known)
        for m in failed:
            log.warning("txn %s: %s/%s left out (rolled back): %s", txn_id, m.vm, m.disk,
                        known[m.key])
        await self._undo(failed)
        return self._yes(txn_id, images, left_out)

    async def _prepare(self, txn_id: str, members: tuple[MemberPlan, ...], cut_at: float,
                       timeout: float | None) -> list[ImageRecord]:
        groups = by_vm(members)
        await gather_all(*(self.backends[vm].wait_copied(ms, timeout)
                           for vm, ms in groups.items()))
        copied: dict[tuple[str, str], int] = {}
        for part in await gather_all(*(self.backends[vm].close_targets(ms)
                                       for vm, ms in groups.items())):
            copied.update(part)
        await self.repo.make_durable([m.image for m in members])
        # no checksum here: it re-reads the image (checksums.py takes it
        # after the commit)
        return [ImageRecord(
            vm=m.vm, disk=m.disk, set_id=txn_id,
            image=m.image, backing=m.backing, mode=m.mode, bytes=copied[m.key], size=m.size,
            cut_at=cut_at, checkpoint=m.new_bitmap)
            for m in members]

    @staticmethod
    def _yes(txn_id: str, images: list[ImageRecord],
             left_out: tuple[tuple[str, str, str], ...] = ()) -> Prepared:
        log.info("txn %s: prepared, votes YES: %s", txn_id,
                 ", ".join(f"{i.vm}/{i.disk} {i.bytes} bytes" for i in images))
        return Prepared(tuple(images), left_out)

    async def publish(self, txn_id: str, members: tuple[MemberPlan, ...],
                      images: tuple[ImageRecord, ...]) -> Event:
        """Drop the previous checkpoints, catalog the images. Committed. (Their
        checksums are taken after, in the background: checksums.py.)"""
        await self._drop({vm: [(m.disk, b) for m in ms for b in m.stale_bitmaps]
                          for vm, ms in by_vm(members).items()})
        self.repo.record(list(images))
        log.info("txn %s: committed: %d images catalogued, previous checkpoints dropped",
                 txn_id, len(images))
        return Committed(images)

    async def rollback(self, cmd: Rollback) -> Event:
        """Thaw, cancel the jobs, drop the new checkpoints, delete the images. Aborted."""
        self.freeze.disarm(cmd.txn_id)
        if cmd.thaw_vms:
            await self.freeze.thaw(cmd.txn_id, cmd.thaw_vms, cmd.quiesce, cmd.after_restart)
        await self._undo(cmd.members)
        log.info("txn %s: rolled back (%s): %d jobs cancelled, new checkpoints dropped",
                 cmd.txn_id, cmd.reason, len(cmd.members))
        return Aborted(cmd.reason)

    async def _undo(self, members: tuple[MemberPlan, ...]) -> None:
        """Cancel the members' jobs, drop their new checkpoints, delete their images."""
        groups = by_vm(members)
        await asyncio.gather(*(self.backends[vm].rollback_jobs(ms)
                               for vm, ms in groups.items()))
        try:
            await self._drop({vm: [(m.disk, m.new_bitmap) for m in ms]
                              for vm, ms in groups.items()})
        except AgentError as err:
            log.warning("rollback: new checkpoints not all dropped: %s", err)
        for m in members:
            self.repo.delete_image(m.image)

    async def _drop(self, checkpoints: dict[str, list[tuple[str, str]]]) -> None:
        await gather_all(*(self.backends[vm].drop_checkpoints(pairs)
                           for vm, pairs in checkpoints.items() if pairs))
