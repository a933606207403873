"""Full and incremental backups up to the barrier, commit, restore: exact at the cut."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

from blocktxn.demo.lab import CLUSTER, images_equal, top_layer_clusters
from blocktxn.v1 import agent_pb2 as pb
from tests.integration.harness import Host, restore, wait_until

DISKS = [("vm1", "d0"), ("vm1", "d1")]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_full_then_two_incrementals_restore_exactly_the_cut(
    make_host: Callable[..., Host],
) -> None:
    host = make_host()
    wl, ga = host.workloads["vm1"], host.gas["vm1"]
    for c in range(0, 40):
        wl.write("d0" if c % 2 else "d1", c)
    wl.start_background(interval=0.005, seed=1)
    sets = ["t1", "t2", "t3"]
    for i, txn in enumerate(sets):
        time.sleep(0.3)  # the workload keeps writing between backups
        cut = host.cut(txn, DISKS)
        expected_mode = pb.BACKUP_MODE_FULL if i == 0 else pb.BACKUP_MODE_INCREMENTAL
        assert [m.mode for m in cut.members] == [expected_mode] * 2, cut
        assert cut.frozen_at > 0 and ga.is_frozen
        host.thaw(txn)
        assert not ga.is_frozen
        vote = host.prepare(txn)
        assert vote.yes, vote.reason
        # no image is re-read on the transaction's path: the checksums come after it
        assert not any(i.sha256 for i in vote.images)
        committed = host.commit(txn)
        assert {(i.vm, i.disk) for i in committed.images} == set(DISKS)
        wait_until(lambda: all(i.sha256 == file_sha256(host.image(i.image))
                               for i in host.stub.ListImages(pb.ListImagesRequest(),
                                                             timeout=10).images),
                   what="every catalogued image's checksum, of its file")
    time.sleep(0.2)
    wl.stop_background()
    assert len(ga.cuts) == 3 and wl.writes_while_frozen == 0

    for i, txn in enumerate(sets):
        cut_seen = ga.cuts[i]
        for vm, disk in DISKS:
            out = restore(host, txn, vm, disk, f"{txn}-{disk}.raw")
            assert images_equal(out, "raw", cut_seen.images[disk], "raw"), (txn, disk)
            # writes after the cut are absent: the live disk moved on, the restore did not
            assert not images_equal(out, "raw", wl.shadows[disk], "raw")
            if i > 0:
                # an incremental holds exactly the clusters written between the two cuts
                written = wl.clusters(disk, ga.cuts[i - 1].seq, cut_seen.seq)
                image = host.image(f"images/{vm}/{disk}/{txn}.qcow2")
                assert top_layer_clusters(image) == written
    # a qcow2 restore of the chain equals it too
    out = restore(host, "t3", "vm1", "d0", "t3-d0.qcow2", fmt="qcow2")
    assert images_equal(out, "qcow2", ga.cuts[2].images["d0"], "raw")

    verify = host.stub.Verify(pb.VerifyRequest(set_id="t3"), timeout=60)
    assert verify.ok and len(verify.checks) == 6  # 3 images per disk chain

    inv = host.inventory()
    disks = {d.name: d for d in inv.vms[0].disks}
    assert set(disks) == {"d0", "d1"}
    assert all(d.checkpoint == "blocktxn:t3" and d.checkpoint_usable for d in disks.values())
    # commit dropped every previous checkpoint: only the last one is left
    for _, disk in DISKS:
        assert set(host.bitmaps("vm1", disk)) == {"blocktxn:t3"}
        dirty = host.bitmaps("vm1", disk)["blocktxn:t3"]["count"]
        assert dirty == len(wl.clusters(disk, ga.cuts[2].seq)) * CLUSTER
    assert host.jobs("vm1") == []


def test_the_inventory_lists_every_disk_whatever_a_backup_is_doing(
    make_host: Callable[..., Host],
) -> None:
    """Found by CI: an inventory taken while a cut starts the jobs (the disk query and the
    graph query are two QMP round trips) saw the job's copy-before-write filter in the
    graph only, and hid the disk under it; the coordinator then refused that VM as having
    no disk. Inventories are taken back to back while backups run."""
    import threading

    host = make_host({"vm1": ["d0", "d1"], "vm2": ["d0"]})
    wrong: list[tuple[str, list[str]]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for v in host.inventory().vms:
                if len(v.disks) != (2 if v.name == "vm1" else 1):
                    wrong.append((v.name, [d.name for d in v.disks]))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for i in range(8):
            assert host.backup(f"t{i}", [("vm1", "d0"), ("vm1", "d1"), ("vm2", "d0")]).yes
    finally:
        done.set()
        poller.join(30)
    assert wrong == []
