"""Two-phase commit across agents with a real etcd and real QEMU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from blocktxn.demo.lab import CLUSTER, images_equal
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb
from tests.integration.cluster import Cluster
from tests.integration.harness import Host, wait_until

VMS = {"vm1": ["d0", "d1"], "vm2": ["d0"]}


def two_hosts(make_cluster: Callable[..., Cluster], replicas: int = 1,
              read_error: tuple[str, ...] = (), first_env: dict[str, str] | None = None,
              **kw: Any) -> Cluster:
    cluster = make_cluster(replicas, first_env, **kw)
    cluster.add_host("h1", VMS)
    cluster.add_host("h2", VMS, read_error=read_error)
    cluster.wait_registered(2)
    for host in cluster.hosts.values():
        for name, wl in host.workloads.items():
            for c in range(12):
                for d in VMS[name]:
                    wl.write(d, c)
    return cluster


def all_disks(cluster: Cluster) -> list[tuple[Host, str, str]]:
    return [(h, vm, d) for h in cluster.hosts.values() for vm, ds in VMS.items() for d in ds]


def checkpoints(host: Host, vm: str, disk: str) -> set[str]:
    return set(host.bitmaps(vm, disk))


def test_grouped_commit_across_two_agents_restores_every_vm_at_the_cut(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = two_hosts(make_cluster)
    for host in cluster.hosts.values():
        for wl in host.workloads.values():
            wl.start_background(interval=0.01)
    first = cluster.start(["h1/vm1", "h1/vm2", "h2/vm1", "h2/vm2"], quiesce=apb.QUIESCE_FREEZE,
                          request_id="req-1")
    again = cluster.start(["h1/vm1"], request_id="req-1")   # same request id: same txn
    assert again.txn_id == first.txn_id
    done = cluster.wait_done(first.txn_id)
    assert done.decision == cpb.DECISION_COMMIT, done.reason
    assert {v.agent_id for v in done.votes if v.yes} == {"h1", "h2"}
    assert len(done.members) == 6 and {m.outcome for m in done.members} == {"committed"}
    # every VM's freeze overlapped every other's: the cut is consistent across VMs
    intervals = [ga.frozen_intervals[-1] for h in cluster.hosts.values()
                 for ga in h.gas.values()]
    assert max(s for s, _ in intervals) < min(e for _, e in intervals)
    second = cluster.start(["h1/vm1", "h1/vm2", "h2/vm1", "h2/vm2"], quiesce=apb.QUIESCE_FREEZE)
    done2 = cluster.wait_done(second.txn_id)
    assert done2.decision == cpb.DECISION_COMMIT, done2.reason
    assert {m.mode for m in done2.members} == {apb.BACKUP_MODE_INCREMENTAL}
    for host in cluster.hosts.values():
        for wl in host.workloads.values():
            wl.stop_background()

    stub = cluster.stub()
    sets = stub.ListBackupSets(cpb.ListBackupSetsRequest(), timeout=10).sets
    assert [s.set_id for s in sets] == [first.txn_id, second.txn_id]
    bset = stub.GetBackupSet(cpb.GetBackupSetRequest(set_id=second.txn_id), timeout=10)
    assert len(bset.images) == 6 and set(bset.agents) == {"h1", "h2"}
    for host, vm, disk in all_disks(cluster):
        out = host.agent.restore_dir / f"{vm}-{disk}.raw"
        stub.Restore(cpb.CoordinatorRestoreRequest(
            set_id=second.txn_id, target=f"{host.agent.agent_id}/{vm}/{disk}",
            destination=str(out)), timeout=60)
        assert images_equal(out, "raw", host.gas[vm].cuts[-1].images[disk], "raw")
        assert checkpoints(host, vm, disk) == {f"blocktxn:{second.txn_id}"}
    assert stub.Verify(cpb.CoordinatorVerifyRequest(set_id=second.txn_id), timeout=60).ok


def test_one_failing_job_aborts_every_agent_and_every_bitmap_is_kept(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = two_hosts(make_cluster, read_error=("d1",))
    targets = ["h1/vm1", "h1/vm2", "h2/vm1", "h2/vm2"]
    base = cluster.wait_done(cluster.start(targets).txn_id)
    assert base.decision == cpb.DECISION_COMMIT, base.reason
    since = {(h.agent.agent_id, vm): h.workloads[vm].seq for h in cluster.hosts.values()
             for vm in VMS}
    for host in cluster.hosts.values():
        for vm, wl in host.workloads.items():
            for c in range(3, 7):
                for d in VMS[vm]:
                    wl.write(d, c)
    cluster.hosts["h2"].workloads["vm1"].arm_read_error("d1", 2)
    failed = cluster.wait_done(cluster.start(targets).txn_id)
    assert failed.decision == cpb.DECISION_ABORT
    assert "h2" in failed.reason and "d1" in failed.reason
    assert {m.outcome for m in failed.members} == {"aborted"}
    for host, vm, disk in all_disks(cluster):
        bitmaps = host.bitmaps(vm, disk)
        assert set(bitmaps) == {f"blocktxn:{base.txn_id}"}
        written = host.workloads[vm].clusters(disk, since[(host.agent.agent_id, vm)])
        assert bitmaps[f"blocktxn:{base.txn_id}"]["count"] == len(written) * CLUSTER
        assert host.jobs(vm) == []
        assert not list((host.agent.repo / "images").glob(f"*/*/{failed.txn_id}.qcow2"))


def test_bad_transaction_requests_are_refused_and_write_nothing(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = two_hosts(make_cluster)
    stub = cluster.stub()
    cases: list[tuple[list[str], dict[str, Any], grpc.StatusCode, str]] = [
        (["h9/vm1"], {}, grpc.StatusCode.NOT_FOUND, "h9"),
        (["h1/vm9"], {}, grpc.StatusCode.NOT_FOUND, "vm9"),
        (["h1/vm1/d7"], {}, grpc.StatusCode.NOT_FOUND, "d7"),
        (["h1/vm1/d0", "h1/vm1"], {}, grpc.StatusCode.INVALID_ARGUMENT, "twice"),
        ([], {}, grpc.StatusCode.INVALID_ARGUMENT, "no targets"),
        (["h1"], {}, grpc.StatusCode.INVALID_ARGUMENT, "AGENT/VM"),
        (["h1/vm1"], {"deadline_s": -5}, grpc.StatusCode.INVALID_ARGUMENT, "past"),
        (["h1/vm1"], {"request_id": "bad id!"}, grpc.StatusCode.INVALID_ARGUMENT, "request id"),
        (["h1/vm1"], {"mode": 17}, grpc.StatusCode.INVALID_ARGUMENT, "mode"),
    ]
    for targets, extra, code, word in cases:
        with pytest.raises(grpc.RpcError) as err:
            cluster.start(targets, **extra)
        assert err.value.code() == code, (targets, err.value)
        assert word in (err.value.details() or ""), err.value.details()
    assert stub.ListTransactions(cpb.ListTransactionsRequest(), timeout=10).transactions == []
    with pytest.raises(grpc.RpcError) as err:
        stub.GetTransaction(cpb.GetTransactionRequest(txn_id="tx-nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # a disk already in an open transaction
    slow = cluster.start(["h1/vm1"], speed=64 << 10)
    with pytest.raises(grpc.RpcError) as err:
        cluster.start(["h2/vm2", "h1/vm1/d1"])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert slow.txn_id in (err.value.details() or "")
    assert len(stub.ListTransactions(cpb.ListTransactionsRequest(), timeout=10)
               .transactions) == 1
    stub.CancelTransaction(cpb.CancelTransactionRequest(txn_id=slow.txn_id), timeout=30)


def test_both_daemons_serve_health_and_reflection(make_cluster: Callable[..., Cluster]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    cluster = make_cluster(1)
    host = cluster.add_host("h1", {"vm1": ["d0"]})
    for address, service in ((cluster.coordinators[0].address, "blocktxn.v1.CoordinatorService"),
                             (host.agent.address, "blocktxn.v1.AgentService")):
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=30,
                                     wait_for_ready=True)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
            names = {s.name for a in answers for s in a.list_services_response.service}
            assert service in names and "grpc.health.v1.Health" in names


def test_a_lost_vm_is_refused_not_silently_skipped(make_cluster: Callable[..., Cluster]) -> None:
    """Found by the chaos suite: a whole-VM target of a VM whose QEMU was gone expanded
    to no disk at all, and the transaction committed without it."""
    cluster = two_hosts(make_cluster)
    host = cluster.hosts["h1"]
    host.workloads["vm2"].detach()
    host.vms["vm2"].kill()

    def vm2_lost() -> bool:
        agents = cluster.stub().ListAgents(cpb.ListAgentsRequest(), timeout=10).agents
        h1 = next(a for a in agents if a.agent_id == "h1")
        return any(v.name == "vm2" and not v.connected for v in h1.inventory.vms)

    wait_until(vm2_lost, what="h1 reports vm2 lost")
    with pytest.raises(grpc.RpcError) as err:
        cluster.start(["h1/vm1", "h1/vm2"])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "vm2" in (err.value.details() or "") and "lost" in (err.value.details() or "")
    stub = cluster.stub()
    assert stub.ListTransactions(cpb.ListTransactionsRequest(), timeout=10).transactions == []
