"""The domain's backup job as the libvirt backend follows it: its end (libvirt's
job-completed event, or asked for when an event was missed), its progress, and
whether a running backup job is this agent's (it writes into the agent's repository)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from ..errors import AgentError, QemuError
from ..planner import short_name
from . import domxml
from .conn import DomainConnection

log = logging.getLogger(__name__)
#: The last completed job's stats, kept by libvirt for a restarted agent to read again.
COMPLETED_STATS = (libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
                   | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED)


@dataclass
class BackupJob:
    """The domain's backup job of this agent (one per cut: every member of the VM)."""

    members: dict[str, tuple[str, int]]  # job id -> (disk, bytes it copies at most)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: str = ""
    processed: int = 0
    total: int = 0


def finish(job: BackupJob, stats: Mapping[str, Any]) -> None:
    """The job ended with these stats (the event's, or libvirt's completed-job stats)."""
    ok = stats.get("success")  # the event has it; completed job stats have "type"
    if ok is None:
        ok = stats.get("type") == libvirt.VIR_DOMAIN_JOB_COMPLETED
    if not ok:
        job.error = str(stats.get("errmsg") or (
            "cancelled" if stats.get("type") == libvirt.VIR_DOMAIN_JOB_CANCELLED
            else "failed"))
    job.done.set()


async def poll(conn: DomainConnection, job: BackupJob) -> None:
    """Ask libvirt how the job is doing (progress, or its end if an event was missed)."""
    dom = conn.dom
    try:
        stats = await conn.call("job stats", dom.jobStats, 0)
        if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE:
            job.processed = int(stats.get("disk_processed", 0))
            job.total = int(stats.get("disk_total", 0))
            return
        if job.done.is_set():
            return
        done = await conn.call("job stats", dom.jobStats, COMPLETED_STATS)
    except AgentError as err:
        log.info("VM %s: job stats: %s", conn.vm, err)
        return
    if not job.done.is_set():
        finish(job, done)


async def running_job_ids(conn: DomainConnection, images: Path, vm: str) -> set[str]:
    """The agent's job ids of the domain's running backup job if it writes into
    *images* (the repository's images of *vm*: ``<disk>/<set>.qcow2``); else empty."""
    dom = conn.dom
    if (await conn.call("job info", dom.jobInfo))[0] == libvirt.VIR_DOMAIN_JOB_NONE:
        return set()
    try:
        targets = domxml.backup_targets(await conn.call("backup XML", dom.backupGetXMLDesc, 0))
    except QemuError:
        return set()  # not a backup job
    ids = set()
    for target in targets.values():
        path = Path(target)
        if path.parent.parent != images:
            return set()  # someone else's backup
        ids.add(short_name(path.stem, vm, path.parent.name, "job"))
    return ids


async def completed_job_ids(conn: DomainConnection, vm: str) -> set[str]:
    """After the agent restarted: the agent's job ids of the domain's last backup job if
    it completed while the agent was away. That job is ours and succeeded when libvirt's
    last completed job is a successful backup, none runs now, and the domain's newest
    checkpoint (the one leaf of its chain: each checkpoint's parent is the one before)
    is ours, created by that backupBegin, with its bitmaps in QEMU. Anything less certain:
    empty (a NO vote)."""
    dom = conn.dom
    if (await conn.call("job info", dom.jobInfo))[0] != libvirt.VIR_DOMAIN_JOB_NONE:
        return set()
    stats = await conn.call("job stats", dom.jobStats, COMPLETED_STATS)
    if (stats.get("operation") != libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP
            or not stats.get("success", stats.get("type") == libvirt.VIR_DOMAIN_JOB_COMPLETED)):
        return set()
    leaves = await conn.call("checkpoint list", dom.listAllCheckpoints,
                             libvirt.VIR_DOMAIN_CHECKPOINT_LIST_LEAVES)
    if len(leaves) != 1 or not leaves[0].getName().startswith(domxml.LIBVIRT_PREFIX):
        return set()
    txn = leaves[0].getName()[len(domxml.LIBVIRT_PREFIX):]
    sizes = domxml.checkpoint_sizes(await conn.call(
        "checkpoint size", leaves[0].getXMLDesc, libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE))
    if None in sizes.values():
        return set()  # its bitmaps are gone (QEMU restarted): that checkpoint is useless
    return {short_name(txn, vm, disk, "job") for disk in sizes}
