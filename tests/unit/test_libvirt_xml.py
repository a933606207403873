"""The libvirt backend's XML documents and checkpoint names (pure)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from blocktxn.agent.config import parse_vm
from blocktxn.agent.libvirt import domxml
from blocktxn.agent.libvirt.redefine import CheckpointRecords, redefine_xml

DOMAIN = """<domain type='qemu'><name>db</name><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='/v/db.qcow2'/><target dev='vda' bus='virtio'/><alias name='virtio-disk0'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='raw'/>
  <source file='/v/scratch.img'/><target dev='vdb' bus='virtio'/></disk>
<disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>
<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
</devices></domain>"""


def test_checkpoint_names_map_both_ways_and_leave_others_alone() -> None:
    assert domxml.to_libvirt("blocktxn:t-1.a") == "blocktxn.t-1.a"
    assert domxml.from_libvirt("blocktxn.t-1.a") == "blocktxn:t-1.a"
    assert domxml.from_libvirt("nightly") == "nightly"
    assert domxml.to_libvirt("nightly") == "nightly"


def test_domain_disks_are_the_disk_devices_with_their_format() -> None:
    facts = domxml.parse_domain(DOMAIN)
    assert facts.guest_agent
    assert [(d.target, d.format, d.source, d.alias) for d in facts.disks] == [
        ("vda", "qcow2", "/v/db.qcow2", "virtio-disk0"), ("vdb", "raw", "/v/scratch.img", "")]


def test_backup_lists_every_disk_and_copies_only_the_members() -> None:
    xml = domxml.backup_xml([domxml.BackupDisk("vda", "/r/a.qcow2", "blocktxn.t1"),
                             domxml.BackupDisk("vdc", "/r/c.qcow2", None)],
                            ["vda", "vdb", "vdc"])
    disks = {d.get("name"): d for d in ET.fromstring(xml).findall("./disks/disk")}
    assert disks["vdb"].get("backup") == "no"
    assert disks["vda"].get("backupmode") == "incremental"
    assert disks["vda"].get("incremental") == "blocktxn.t1"
    assert disks["vdc"].get("backupmode") == "full"
    assert disks["vdc"].find("target").get("file") == "/r/c.qcow2"  # type: ignore[union-attr]


def test_checkpoint_has_a_bitmap_on_the_members_only() -> None:
    xml = domxml.checkpoint_xml("blocktxn.t2", ["vda"], ["vda", "vdb"])
    assert domxml.checkpoint_disks(xml) == {"vda"}
    assert ET.fromstring(xml).findtext("name") == "blocktxn.t2"


def test_libvirt_vm_spec() -> None:
    vm = parse_vm("db=libvirt:db-prod")
    assert vm.libvirt_domain == "db-prod" and vm.qmp == ""
    for bad in ("db=libvirt:", "db=libvirt:x,ga=/s", "db=libvirt:a/b"):
        with pytest.raises(ValueError, match="libvirt:DOMAIN"):
            parse_vm(bad)


def test_a_redefine_holds_the_cut_checkpoint_and_its_creation_time() -> None:
    cut = domxml.checkpoint_xml("blocktxn.t1", ["vda"], ["vda", "vdb"])
    root = ET.fromstring(redefine_xml(cut, 1796340118))
    assert root.findtext("name") == "blocktxn.t1"
    assert root.findtext("creationTime") == "1796340118"
    assert [(d.get("name"), d.get("checkpoint")) for d in root.findall("./disks/disk")] == [
        ("vda", "bitmap"), ("vdb", "no")]


def test_checkpoint_records_are_one_file_each_and_go_with_their_checkpoint(
        tmp_path: Path) -> None:
    records = CheckpointRecords(tmp_path / "libvirt" / "vm1")
    assert records.names() == set()
    records.save("blocktxn.t1", "<domaincheckpoint/>")
    records.save("blocktxn.t2", "<x/>")
    assert records.names() == {"blocktxn.t1", "blocktxn.t2"}
    assert records.xml("blocktxn.t2") == "<x/>"
    records.forget("blocktxn.t1")
    records.forget("blocktxn.t1")  # idempotent
    assert records.names() == {"blocktxn.t2"}
