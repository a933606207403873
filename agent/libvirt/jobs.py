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
        done = await conn.call("job stats", dom.jobStats,
                               libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
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
