"""The backup steps on one QEMU, in QMP: one function per step, and the only place
that names QMP's block commands.

The checkpoint scheme (DESIGN.md, verified on QEMU 7.2): the cut is ONE
``transaction`` (individual completion) of ``block-dirty-bitmap-add NEW`` for every
disk and ``blockdev-backup`` with ``auto-finalize/auto-dismiss: false``; an
incremental copies ``sync: bitmap`` from OLD with ``bitmap-mode: never``, so OLD keeps
every bit until the decision. A job at ``pending`` has copied everything and
committed nothing; finalize → dismiss → ``blockdev-del`` of the target makes QEMU
flush and close the image.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..aio import gather_all
from ..backend import CHECKPOINT_PREFIX, NODE_PREFIX
from ..errors import AgentError, QemuError, VmLostError
from ..participant_messages import MemberPlan
from .qmp import VmConnection

log = logging.getLogger(__name__)


async def can_pause(conn: VmConnection) -> bool:
    """QMP ``stop`` exists (qemu-system-*; not qemu-storage-daemon)."""
    return "stop" in await conn.commands()


async def pause(conn: VmConnection) -> None:
    await conn.execute("stop")


async def resume(conn: VmConnection) -> None:
    await conn.execute("cont")


async def attach_targets(conn: VmConnection, members: Sequence[MemberPlan],
                         path_of: Callable[[str], Path]) -> None:
    """Open every member's target image as a node of its own (no backing: the job
    writes only what it copies)."""
    await gather_all(*(conn.execute("blockdev-add", {
        "driver": "qcow2", "node-name": m.target_node, "backing": None,
        "file": {"driver": "file", "filename": str(path_of(m.image))},
    }) for m in members))


async def start_jobs(conn: VmConnection, members: Sequence[MemberPlan]) -> None:
    """Add every new checkpoint and start every backup job in ONE QMP transaction."""
    actions: list[dict[str, Any]] = [
        {"type": "block-dirty-bitmap-add",
         "data": {"node": m.disk, "name": m.new_bitmap, "persistent": True}}
        for m in members]
    for m in members:
        backup: dict[str, Any] = {
            "job-id": m.job_id, "device": m.disk, "target": m.target_node,
            "auto-finalize": False, "auto-dismiss": False,
        }
        if m.mode == "incremental":
            backup.update(sync="bitmap", bitmap=m.sync_bitmap, **{"bitmap-mode": "never"})
        else:
            backup["sync"] = "full"
        if m.speed:
            backup["speed"] = m.speed
        actions.append({"type": "blockdev-backup", "data": backup})
    await conn.execute("transaction", {
        "actions": actions, "properties": {"completion-mode": "individual"}})


async def wait_pending(conn: VmConnection, members: Sequence[MemberPlan],
                       timeout: float | None) -> None:
    """Wait until every member's job is ``pending`` (copied, nothing committed).

    Raises:
        QemuError: a job concluded (failed or cancelled) instead.
    """
    async def one(m: MemberPlan) -> None:
        job = await conn.wait_job(m.job_id, {"pending"}, timeout)
        if job.status != "pending":
            raise QemuError(f"{m.vm}/{m.disk}: backup job {job.status}"
                            f"{': ' + job.error if job.error else ''}")

    await gather_all(*(one(m) for m in members))


async def finish(conn: VmConnection, m: MemberPlan) -> int:
    """Finalize and dismiss a pending job, then delete its target node (QEMU flushes
    and closes the image); return the bytes copied."""
    await conn.execute("job-finalize", {"id": m.job_id})
    job = await conn.wait_job(m.job_id, {"concluded"}, 60)
    if job.error:
        raise QemuError(f"{m.vm}/{m.disk}: finalize failed: {job.error}")
    copied = job.done
    await conn.execute("job-dismiss", {"id": m.job_id})
    await conn.execute("blockdev-del", {"node-name": m.target_node})
    return copied


async def remove_bitmaps(conn: VmConnection, bitmaps: Sequence[tuple[str, str]]) -> None:
    """Drop (disk, bitmap) pairs that exist; a lost VM is logged, not an error. All in
    one QMP ``transaction`` when all exist (all-or-nothing: a failed one leaves every
    bitmap as it was), else one by one as the disks' query shows them."""
    if not bitmaps:
        return
    if not conn.connected:
        log.warning("vm %s lost: bitmaps %s left for later cleanup", conn.name, list(bitmaps))
        return
    try:
        try:  # usually every one is there: ONE transaction, no query of the disks
            await conn.execute("transaction", {"actions": [
                {"type": "block-dirty-bitmap-remove", "data": {"node": disk, "name": name}}
                for disk, name in bitmaps]})
            return
        except QemuError:  # one is gone (a repeated decision) or refused: none was
            pass           # removed; one by one, those that are there
        nodes = await conn.disks()
        await asyncio.gather(*(
            conn.execute("block-dirty-bitmap-remove", {"node": disk, "name": name})
            for disk, name in bitmaps
            if disk in nodes and nodes[disk].checkpoint(name) is not None))
    except VmLostError:
        log.warning("vm %s lost while dropping bitmaps %s", conn.name, list(bitmaps))


async def cancel_jobs(conn: VmConnection, members: Sequence[MemberPlan]) -> None:
    """Cancel and dismiss the members' jobs, delete their target nodes (one query of
    jobs and one of nodes for all of them); best effort, member by member and step by
    step: a job that another step dismissed meanwhile (a barrier finishing while an
    Abort comes) does not stop the rest, and every node still there is deleted."""
    if not conn.connected:
        return
    problems: list[str] = []
    try:
        jobs = dict(await conn.refresh_jobs())
    except AgentError as err:
        log.warning("rollback on %s incomplete: %s", conn.name, err)
        return

    async def end(job_id: str) -> None:
        try:
            if jobs[job_id].status != "concluded":
                await conn.execute("job-cancel", {"id": job_id})
                await conn.wait_job(job_id, {"concluded"}, 60)
        except AgentError as err:  # gone or concluded meanwhile: dismiss what is left
            problems.append(str(err))
        try:
            await conn.execute("job-dismiss", {"id": job_id})
        except AgentError as err:
            problems.append(str(err))

    async def delete(node: str) -> None:
        try:
            await conn.execute("blockdev-del", {"node-name": node})
        except AgentError as err:
            problems.append(str(err))

    await asyncio.gather(*(end(m.job_id) for m in members if m.job_id in jobs))
    try:
        nodes = await conn.node_names()
    except AgentError as err:
        log.warning("rollback on %s incomplete: %s", conn.name, err)
        return
    await asyncio.gather(*(delete(m.target_node) for m in members if m.target_node in nodes))
    if problems:  # usually harmless (already gone); a leftover is swept on reconnect
        log.info("rollback on %s: %s", conn.name, "; ".join(problems))


async def sweep(conn: VmConnection, keep_jobs: set[str], keep_nodes: set[str],
                keep_bitmaps: dict[str, set[str]]) -> list[str]:
    """Remove this agent's leftovers (named with its prefixes) that no open transaction
    and no committed checkpoint owns: jobs, target nodes, then bitmaps. Return what went.
    A rollback that found the VM disconnected leaves them behind; they would keep a disk
    (or its checkpoint) busy forever."""
    gone: list[str] = []
    jobs = dict(await conn.refresh_jobs())
    stale = [j for j in jobs if j not in keep_jobs]
    for job_id in stale:
        try:
            if jobs[job_id].status != "concluded":
                await conn.execute("job-cancel", {"id": job_id})
                await conn.wait_job(job_id, {"concluded"}, 60)
            await conn.execute("job-dismiss", {"id": job_id})
        except QemuError:
            if job_id in await conn.refresh_jobs():
                raise
            continue  # ended meanwhile: its own rollback or commit dismissed it
        gone.append(f"job {job_id}")
    for node in sorted(await conn.node_names()):
        if node.startswith(NODE_PREFIX) and node not in keep_nodes:
            await conn.execute("blockdev-del", {"node-name": node})
            gone.append(f"node {node}")
    for disk in (await conn.disks()).values():
        for c in disk.checkpoints:
            if c.name.startswith(CHECKPOINT_PREFIX) and c.name not in keep_bitmaps.get(
                    disk.name, set()):
                await conn.execute("block-dirty-bitmap-remove",
                                   {"node": disk.name, "name": c.name})
                gone.append(f"bitmap {disk.name}/{c.name}")
    return gone
