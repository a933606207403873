"""Grouped transactions across two hosts with real guests: etcd, a coordinator and two
agents, each serving one booted test guest writing sequenced records on its ext4 disk.

Host h1 serves its guest under bare QEMU (its own QMP monitor, the guest's qemu-ga
socket); host h2 serves its guest as a libvirt domain (libvirt's guest-agent channel).
One of each so that one transaction freezes real guests through both quiesce paths at
once (qemu-ga directly, and libvirt's fsFreeze), which no other test does; the bare-QEMU
and libvirt paths alone are in test_qemu_agent_guest and test_libvirt_guest.

A full and then an incremental, both grouped with quiesce freeze: each commits on both
hosts; every guest was frozen before any was thawed (each agent's journal: freeze begun
at ``frozen_at``, complete by ``cut_at``, thawed at ``Thawed.at`` on the coordinator's
Thaw, not on its own; every ``cut_at`` is before any thaw and before the coordinator saw
the cut done, and ``txn show --json``'s ``frozen_from``/``thawed_at`` are the first
freeze and the last thaw); and each restored disk is fsck-clean with exactly the records
of its frozen file system (tests/guest/checks.py).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blocktxn.client import SyncClient
from blocktxn.demo.lab import AgentProcess
from blocktxn.demo.realguest.image import GuestImage
from blocktxn.demo.realguest.qga import call_once
from blocktxn.demo.realguest.records import freeze_window, guest_log, overlap_problems
from blocktxn.demo.realguest.vm import DATA_NODE, GuestVm, make_qcow2_data_disk
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb
from tests.guest.checks import assert_point_in_time
from tests.guest.libvirt_guest import LibvirtGuest
from tests.integration.cluster import Cluster
from tests.integration.conftest import libvirt_daemons  # noqa: F401  (the fixture)
from tests.integration.libvirt_lab import URI

pytestmark = pytest.mark.integration

TARGETS = {"h1": f"h1/vm1/{DATA_NODE}", "h2": "h2/vm1/vda"}


@pytest.fixture
def guests(guest_image: GuestImage, tmp_path: Path, libvirt_daemons: None  # noqa: F811
           ) -> Iterator[tuple[GuestVm, LibvirtGuest]]:
    """h1's guest under bare QEMU and h2's as a libvirt domain, booting together."""
    disk = tmp_path / "h1-data.qcow2"
    make_qcow2_data_disk(disk)
    vm = GuestVm(guest_image, tmp_path / "h1-vm", disk, data_format="qcow2")
    lv: LibvirtGuest | None = None
    try:
        vm.launch()
        lv = LibvirtGuest(guest_image, tmp_path / "h2-guest")
        vm.wait_ready()
        lv.wait_ready()
        yield vm, lv
    finally:
        if lv is not None:
            lv.close()
        vm.close()


def thawed_at(cluster: Cluster, txn_id: str) -> float:
    """The coordinator's thawed_at of *txn_id* (0 until the agents thawed)."""
    txn = cluster.any_stub().GetTransaction(cpb.GetTransactionRequest(txn_id=txn_id),
                                            timeout=10)
    return float(txn.thawed_at)


def all_thawed(freeze_status: dict[str, Callable[[], Any]]) -> bool:
    return all(status() == "thawed" for status in freeze_status.values())


def wait_for(pred: Callable[[], Any], what: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def test_a_grouped_freeze_across_a_qemu_and_a_libvirt_host_overlaps_and_restores_clean(
        guests: tuple[GuestVm, LibvirtGuest], tmp_path: Path) -> None:
    qemu_guest, libvirt_guest = guests
    cluster = Cluster(tmp_path / "cluster")
    agents = {
        "h1": AgentProcess("h1", tmp_path / "h1", [], {}, extra=[
            "--coordinator", cluster.addresses,
            "--vm", f"vm1={qemu_guest.agent_qmp_socket},ga={qemu_guest.agent_socket}"]),
        "h2": AgentProcess("h2", tmp_path / "h2", [], {}, extra=[
            "--coordinator", cluster.addresses, "--libvirt-uri", URI,
            "--vm", f"vm1=libvirt:{libvirt_guest.name}"]),
    }
    logs: dict[str, Callable[[], list[int]]] = {
        "h1": lambda: guest_log(qemu_guest.agent_socket), "h2": libvirt_guest.log}
    freeze_status: dict[str, Callable[[], Any]] = {
        "h1": lambda: call_once(qemu_guest.agent_socket, "guest-fsfreeze-status"),
        "h2": lambda: libvirt_guest.agent("guest-fsfreeze-status")}
    try:
        for a in agents.values():
            a.start()
        cluster.wait_registered(2, timeout=60)
        client = SyncClient(cluster.addresses, timeout=60)
        for mode in (apb.BACKUP_MODE_FULL, apb.BACKUP_MODE_INCREMENTAL):
            before = {h: read() for h, read in logs.items()}     # acknowledged before the cut
            txn = cluster.start(list(TARGETS.values()), mode=mode,
                                quiesce=apb.QUIESCE_FREEZE, freeze_timeout_s=60,
                                completion=cpb.COMPLETION_GROUPED)
            # the coordinator records each agent's thaw as it hears it: then wait for both
            wait_for(functools.partial(thawed_at, cluster, txn.txn_id), "the thaw")
            wait_for(functools.partial(all_thawed, freeze_status), "both guests thawed")
            after_thaw = {h: read() for h, read in logs.items()}
            done = cluster.wait_done(txn.txn_id, timeout=180)
            assert done.decision == cpb.DECISION_COMMIT, done.reason
            assert sorted((m.agent_id, m.mode, m.outcome) for m in done.members) == [
                ("h1", mode, "committed"), ("h2", mode, "committed")]

            windows = {h: freeze_window(a.repo, txn.txn_id) for h, a in agents.items()}
            # every guest frozen (its freeze done by cut_at) before any was thawed
            problems = overlap_problems(windows, done.cut_done_at)
            assert not problems, problems
            shown = json.loads(subprocess.run(
                [sys.executable, "-m", "blocktxn", "--coordinator", cluster.addresses,
                 "txn", "show", txn.txn_id, "--json"],
                capture_output=True, text=True, check=True).stdout)
            assert shown["state"] == "committed"
            assert shown["frozen_from"] == pytest.approx(
                min(w.frozen_at for w in windows.values()))
            assert shown["thawed_at"] == pytest.approx(
                max(w.thawed_at for w in windows.values()))

            for h, target in TARGETS.items():
                out = agents[h].restore_dir / f"{txn.txn_id}.raw"
                client.restore(done.set_id, target, str(out))
                assert_point_in_time(out, before[h], after_thaw[h])
    finally:
        for a in agents.values():
            a.stop()
        cluster.close()
