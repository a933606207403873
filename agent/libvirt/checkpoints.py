"""libvirt checkpoints as the backend reads and deletes them."""

from __future__ import annotations

import logging
from typing import Any

import libvirt

from ..errors import QemuError
from . import domxml
from .conn import DomainConnection
from .redefine import CheckpointRecords

log = logging.getLogger(__name__)


async def sizes(conn: DomainConnection, ckpt: Any) -> dict[str, int | None]:
    """disk -> dirty bytes of *ckpt* (None: QEMU has no such bitmap)."""
    return domxml.checkpoint_sizes(await conn.call(
        "checkpoint size", ckpt.getXMLDesc, libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE))


async def delete(conn: DomainConnection, ckpt: Any, records: CheckpointRecords) -> None:
    """Delete a checkpoint and its bitmaps, then the agent's record of it. One whose
    bitmap QEMU lost (killed before storing it) cannot be deleted that way: its metadata
    alone is left, and goes."""
    try:
        await conn.call("checkpoint delete", ckpt.delete, 0)
    except QemuError:
        if None not in (await sizes(conn, ckpt)).values():
            raise
        await conn.call("checkpoint delete", ckpt.delete,
                        libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        log.warning("VM %s: deleted checkpoint %s, whose bitmap QEMU had lost", conn.vm,
                    ckpt.getName())
    records.forget(ckpt.getName())


async def delete_broken(conn: DomainConnection, names: set[str],
                        records: CheckpointRecords) -> None:
    """Delete our checkpoints whose bitmaps QEMU lost: libvirt refuses every new
    checkpoint while one is broken. Their disks' next backup is full anyway (the
    planner saw them inconsistent)."""
    dom = conn.dom
    for name in sorted(names):
        await delete(conn, await conn.call(
            "checkpoint lookup", dom.checkpointLookupByName, domxml.to_libvirt(name), 0),
            records)
