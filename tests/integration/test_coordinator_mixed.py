"""A grouped transaction over two agents with different backends: a bare-QEMU VM on one,
a libvirt domain on the other. It commits as one; when one member fails, both reclaim
their checkpoints exactly."""

from __future__ import annotations

from collections.abc import Callable

from blocktxn.demo.guest import Cut
from blocktxn.demo.lab import CLUSTER, images_equal
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb
from tests.integration.cluster import Cluster
from tests.integration.libvirt_lab import LibvirtHost

DISKS = {"h1": ["d0", "d1"], "h2": ["vda", "vdb"]}  # h1: bare QEMU, h2: libvirt
TARGETS = ["h1/vm1", "h2/vm1"]


def mixed(make_cluster: Callable[..., Cluster],
          make_libvirt_host: Callable[..., LibvirtHost],
          read_error: tuple[str, ...] = ()) -> Cluster:
    cluster = make_cluster()
    cluster.add_host("h1", {"vm1": DISKS["h1"]}, read_error=read_error)
    h2 = make_libvirt_host({"vm1": DISKS["h2"]}, start=False, agent_id="h2")
    h2.agent.extra += ["--coordinator", cluster.addresses]
    h2.start_agent()
    cluster.hosts["h2"] = h2  # closed by both fixtures: closing twice is harmless
    cluster.wait_registered(2)
    write(cluster, range(0, 12))
    return cluster


def write(cluster: Cluster, clusters: range) -> None:
    for agent_id, host in cluster.hosts.items():
        for c in clusters:
            for d in DISKS[agent_id]:
                host.workloads["vm1"].write(d, c)


def snapshot(cluster: Cluster, tag: str) -> dict[str, Cut]:
    """The disks' content now (the test is the only writer: no write during the cut)."""
    return {a: h.workloads["vm1"].snapshot(tag) for a, h in cluster.hosts.items()}


def test_a_grouped_transaction_over_qemu_and_libvirt_commits_and_restores_the_cut(
        make_cluster: Callable[..., Cluster],
        make_libvirt_host: Callable[..., LibvirtHost]) -> None:
    cluster = mixed(make_cluster, make_libvirt_host)
    first = cluster.wait_done(cluster.start(TARGETS, quiesce=apb.QUIESCE_NONE).txn_id)
    assert first.decision == cpb.DECISION_COMMIT, first.reason
    write(cluster, range(5, 9))
    cuts = snapshot(cluster, "second")
    second = cluster.wait_done(cluster.start(TARGETS, quiesce=apb.QUIESCE_NONE).txn_id)
    assert second.decision == cpb.DECISION_COMMIT, second.reason
    assert {v.agent_id for v in second.votes if v.yes} == {"h1", "h2"}
    assert {m.mode for m in second.members} == {apb.BACKUP_MODE_INCREMENTAL}
    assert len(second.members) == 4
    stub = cluster.stub()
    for agent_id, host in cluster.hosts.items():
        for disk in DISKS[agent_id]:
            out = host.agent.restore_dir / f"{agent_id}-{disk}.raw"
            stub.Restore(cpb.CoordinatorRestoreRequest(
                set_id=second.txn_id, target=f"{agent_id}/vm1/{disk}",
                destination=str(out)), timeout=60)
            assert images_equal(out, "raw", cuts[agent_id].images[disk], "raw")
            assert set(host.bitmaps("vm1", disk)) == {f"blocktxn:{second.txn_id}"}
    assert stub.Verify(cpb.CoordinatorVerifyRequest(set_id=second.txn_id), timeout=60).ok


def test_a_failed_member_aborts_both_backends_and_both_keep_every_write(
        make_cluster: Callable[..., Cluster],
        make_libvirt_host: Callable[..., LibvirtHost]) -> None:
    cluster = mixed(make_cluster, make_libvirt_host, read_error=("d1",))
    base = cluster.wait_done(cluster.start(TARGETS, quiesce=apb.QUIESCE_NONE).txn_id)
    assert base.decision == cpb.DECISION_COMMIT, base.reason
    since = {a: h.workloads["vm1"].seq for a, h in cluster.hosts.items()}
    write(cluster, range(3, 7))
    cluster.hosts["h1"].workloads["vm1"].arm_read_error("d1", 2)  # h1's d1 job fails
    failed = cluster.wait_done(cluster.start(TARGETS, quiesce=apb.QUIESCE_NONE).txn_id)
    assert failed.decision == cpb.DECISION_ABORT
    assert "h1" in failed.reason and "d1" in failed.reason
    assert {m.outcome for m in failed.members} == {"aborted"}
    for agent_id, host in cluster.hosts.items():
        wl = host.workloads["vm1"]
        for disk in DISKS[agent_id]:
            bitmaps = host.bitmaps("vm1", disk)
            assert set(bitmaps) == {f"blocktxn:{base.txn_id}"}, (agent_id, disk)
            assert bitmaps[f"blocktxn:{base.txn_id}"]["count"] == len(
                wl.clusters(disk, since[agent_id])) * CLUSTER
        assert host.jobs("vm1") == []
        assert not list((host.agent.repo / "images").glob(f"*/*/{failed.txn_id}.qcow2"))
