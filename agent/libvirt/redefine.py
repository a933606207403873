"""The agent's own record of every libvirt checkpoint it created, and libvirt's redefine
from it when libvirt lost the checkpoint's metadata while QEMU still has its bitmap
(``checkpoint-delete --metadata``, or the domain undefined and defined again).

A record is the ``<domaincheckpoint>`` the agent gave ``backupBegin`` plus its creation
time: ``<repo>/libvirt/<vm>/<libvirt name>.xml``, written before the checkpoint is
created (a record without a checkpoint is harmless) and removed once the checkpoint is
deleted. Redefining asks libvirt 9.0 to check QEMU's bitmaps first
(``VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE``): without it libvirt accepts a
checkpoint whose bitmap is gone. Refused with VIR_ERR_CHECKPOINT_INCONSISTENT, the bitmap
is really gone: the record goes, nothing is defined, and the planner sees the checkpoint
missing (the disk's next backup is full).
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import libvirt

from ..errors import AgentError
from .conn import DomainConnection

log = logging.getLogger(__name__)
REDEFINE = (libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
            | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE)


def redefine_xml(checkpoint_xml: str, created: int) -> str:
    """The checkpoint XML given to backupBegin, with the ``<creationTime>`` libvirt
    requires for a redefine (the ``<domain>`` is not required)."""
    root = ET.fromstring(checkpoint_xml)
    ET.SubElement(root, "creationTime").text = str(created)
    return ET.tostring(root, encoding="unicode")


class CheckpointRecords:
    """One VM's records, one file per libvirt checkpoint name."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def save(self, name: str, xml: str) -> None:
        """Record checkpoint *name* (libvirt's spelling) as *xml* (atomic, no fsync: a
        record lost in a crash only costs a full backup)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.tmp"
        tmp.write_text(xml)
        os.replace(tmp, self.root / f"{name}.xml")

    def forget(self, name: str) -> None:
        (self.root / f"{name}.xml").unlink(missing_ok=True)

    def names(self) -> set[str]:
        if not self.root.is_dir():
            return set()
        return {p.name[:-len(".xml")] for p in self.root.glob("*.xml")}

    def xml(self, name: str) -> str:
        return (self.root / f"{name}.xml").read_text()


async def redefine_missing(conn: DomainConnection, records: CheckpointRecords,
                           existing: Sequence[str]) -> list[str]:
    """Redefine every recorded checkpoint libvirt does not list; the names redefined.
    A redefine refused otherwise than for a bitmap gone keeps its record for the next
    call (the checkpoint counts as missing meanwhile)."""
    done = []
    for name in sorted(records.names() - set(existing)):
        try:
            await conn.call("checkpoint redefine", conn.dom.checkpointCreateXML,
                            records.xml(name), REDEFINE)
        except AgentError as err:
            cause = err.__cause__
            if not (isinstance(cause, libvirt.libvirtError)
                    and cause.get_error_code() == libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT):
                # kept for the next reading; meanwhile the checkpoint counts as missing
                log.warning("VM %s: redefining checkpoint %s: %s", conn.vm, name, err)
                continue
            records.forget(name)
            log.warning("VM %s: libvirt lost checkpoint %s and QEMU its bitmap (%s): the "
                        "next backup of its disks is full", conn.vm, name,
                        cause.get_error_message())
            continue
        log.warning("VM %s: libvirt had lost the metadata of checkpoint %s; redefined it "
                    "from the agent's record (QEMU still has its bitmaps)", conn.vm, name)
        done.append(name)
    return done
