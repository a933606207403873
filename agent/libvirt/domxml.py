"""libvirt's XML documents for the backend, pure (no libvirt call): a domain's disks,
the ``<domainbackup>`` and ``<domaincheckpoint>`` of a cut, a checkpoint's per-disk
dirty sizes, and the agent's checkpoint names in libvirt's spelling.

libvirt checkpoint names allow only ``[A-Za-z0-9_-][A-Za-z0-9_.-]*``: the agent's
``blocktxn:<txn>`` is ``blocktxn.<txn>`` in libvirt (and as QEMU's bitmap name). Both
ways are one-to-one (a libvirt name never holds ``:``), so the planner, journal and
catalog keep the agent's names unchanged.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

from ..backend import CHECKPOINT_PREFIX

LIBVIRT_PREFIX = "blocktxn."
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"


def to_libvirt(name: str) -> str:
    """The agent's checkpoint name as libvirt spells it."""
    if name.startswith(CHECKPOINT_PREFIX):
        return LIBVIRT_PREFIX + name[len(CHECKPOINT_PREFIX):]
    return name


def from_libvirt(name: str) -> str:
    """A libvirt checkpoint name as the agent spells it (ours get the agent's prefix)."""
    if name.startswith(LIBVIRT_PREFIX):
        return CHECKPOINT_PREFIX + name[len(LIBVIRT_PREFIX):]
    return name


@dataclass(frozen=True)
class DomainDisk:
    """One ``<disk device='disk'>`` of a domain's live definition."""

    target: str  # the disk's name for the agent and libvirt (vda, sdb, ...)
    source: str  # image file ("" for a non-file disk)
    format: str  # driver type: qcow2, raw, ...
    alias: str  # QEMU device id ("" in an inactive definition)


@dataclass(frozen=True)
class DomainFacts:
    """What the backend reads from a domain's definition."""

    disks: tuple[DomainDisk, ...]
    guest_agent: bool  # a qemu-ga channel is configured


def parse_domain(xml: str) -> DomainFacts:
    """The disks and guest-agent channel of a domain's XML."""
    root = ET.fromstring(xml)
    disks = []
    for d in root.findall("./devices/disk"):
        if d.get("device", "disk") != "disk":
            continue  # cdrom, floppy, lun: nothing to back up
        target = d.find("target")
        if target is None or not target.get("dev"):
            continue
        source = d.find("source")
        driver = d.find("driver")
        alias = d.find("alias")
        disks.append(DomainDisk(
            target=target.get("dev", ""),
            source=(source.get("file") or source.get("dev") or "") if source is not None else "",
            format=driver.get("type", "raw") if driver is not None else "raw",
            alias=alias.get("name", "") if alias is not None else ""))
    agent = any(t.get("name") == GUEST_AGENT_CHANNEL
                for t in root.findall("./devices/channel/target"))
    return DomainFacts(tuple(disks), agent)


@dataclass(frozen=True)
class BackupDisk:
    """One member disk of a cut: where libvirt writes it and what it copies."""

    disk: str
    target: str  # an existing qcow2 file (created by the repository)
    incremental: str | None  # the libvirt checkpoint it copies from (None: full)


def backup_xml(members: Sequence[BackupDisk], all_disks: Sequence[str]) -> str:
    """A push-mode ``<domainbackup>`` that copies the members (each full or incremental
    from its own checkpoint) into their existing targets and nothing else."""
    root = ET.Element("domainbackup", mode="push")
    disks = ET.SubElement(root, "disks")
    by_disk = {m.disk: m for m in members}
    for name in all_disks:
        m = by_disk.get(name)
        if m is None:
            ET.SubElement(disks, "disk", name=name, backup="no")
            continue
        attrs = {"name": name, "backup": "yes", "type": "file"}
        if m.incremental:
            attrs.update(backupmode="incremental", incremental=m.incremental)
        else:
            attrs["backupmode"] = "full"
        el = ET.SubElement(disks, "disk", attrs)
        ET.SubElement(el, "target", file=m.target)
        ET.SubElement(el, "driver", type="qcow2")
    return ET.tostring(root, encoding="unicode")


def checkpoint_xml(name: str, members: Sequence[str], all_disks: Sequence[str]) -> str:
    """A ``<domaincheckpoint>`` *name* with a bitmap on the member disks only."""
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    disks = ET.SubElement(root, "disks")
    for disk in all_disks:
        ET.SubElement(disks, "disk", name=disk,
                      checkpoint="bitmap" if disk in members else "no")
    return ET.tostring(root, encoding="unicode")


def checkpoint_sizes(xml: str) -> dict[str, int | None]:
    """disk -> dirty bytes, from a checkpoint's XML with sizes (disks with a bitmap);
    None where QEMU has no such bitmap (libvirt then gives no size: the bitmap was
    lost with a QEMU that was killed before it stored it)."""
    root = ET.fromstring(xml)
    return {d.get("name", ""): int(d.get("size", "0")) if d.get("size") else None
            for d in root.findall("./disks/disk") if d.get("checkpoint") == "bitmap"}


def checkpoint_disks(xml: str) -> set[str]:
    """The disks a checkpoint has a bitmap on."""
    root = ET.fromstring(xml)
    return {d.get("name", "") for d in root.findall("./disks/disk")
            if d.get("checkpoint") == "bitmap"}


def backup_targets(xml: str) -> dict[str, str]:
    """disk -> target file of a running backup job's XML (push mode)."""
    root = ET.fromstring(xml)
    out = {}
    for d in root.findall("./disks/disk"):
        target = d.find("target")
        if d.get("backup", "yes") == "yes" and target is not None and target.get("file"):
            out[d.get("name", "")] = target.get("file", "")
    return out
