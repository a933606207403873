"""Coordinator faults: cancel, individual mode, leader killed, fencing, deadline, etcd restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from blocktxn.coordinator.errors import NotLeaderError, StoreCorruptError, StoreRejectedError
from blocktxn.coordinator.records import (
    BackupSet,
    DecisionRecord,
    MemberRecord,
    SetImage,
    TxnRecord,
    VoteRecord,
)
from blocktxn.coordinator.store import PREFIX, Store
from blocktxn.coordinator.txn_messages import Decision, TxnPhase
from blocktxn.demo.lab import CLUSTER, free_port
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb
from tests.integration.cluster import Cluster
from tests.integration.harness import wait_until
from tests.integration.test_coordinator import VMS, all_disks, two_hosts

TARGETS = ["h1/vm1", "h1/vm2", "h2/vm1", "h2/vm2"]
SLOW = 256 << 10


def prime(cluster: Cluster) -> tuple[str, dict[tuple[str, str], int]]:
    """A committed base set, then writes: returns (base txn, workload seq at the base)."""
    base = cluster.wait_done(cluster.start(TARGETS).txn_id)
    assert base.decision == cpb.DECISION_COMMIT, base.reason
    since = {(h.agent.agent_id, vm): h.workloads[vm].seq for h in cluster.hosts.values()
             for vm in VMS}
    for host in cluster.hosts.values():
        for vm, wl in host.workloads.items():
            for c in range(0, 24):
                for d in VMS[vm]:
                    wl.write(d, c)
    return base.txn_id, since


def assert_kept(cluster: Cluster, base: str, since: dict[tuple[str, str], int],
                hosts: tuple[str, ...] = ("h1", "h2")) -> None:
    """An aborted member kept its previous checkpoint with every write since."""
    for host, vm, disk in all_disks(cluster):
        if host.agent.agent_id not in hosts:
            continue
        bitmaps = host.bitmaps(vm, disk)
        assert set(bitmaps) == {f"blocktxn:{base}"}, bitmaps
        written = host.workloads[vm].clusters(disk, since[(host.agent.agent_id, vm)])
        assert bitmaps[f"blocktxn:{base}"]["count"] == len(written) * CLUSTER
        assert host.jobs(vm) == []


def phase_of(cluster: Cluster, txn_id: str) -> int:
    return int(cluster.any_stub().GetTransaction(
        cpb.GetTransactionRequest(txn_id=txn_id), timeout=10).phase)


def test_cancel_during_run_aborts_everywhere(make_cluster: Callable[..., Cluster]) -> None:
    cluster = two_hosts(make_cluster)
    base, since = prime(cluster)
    txn = cluster.start(TARGETS, speed=SLOW)
    wait_until(lambda: phase_of(cluster, txn.txn_id) == cpb.TXN_PHASE_RUNNING)
    cancelled = cluster.stub().CancelTransaction(
        cpb.CancelTransactionRequest(txn_id=txn.txn_id, reason="operator"), timeout=30)
    assert cancelled.decision == cpb.DECISION_ABORT and "operator" in cancelled.reason
    done = cluster.wait_done(txn.txn_id)
    assert done.decision == cpb.DECISION_ABORT
    assert_kept(cluster, base, since)


def test_individual_mode_commits_every_healthy_disk(make_cluster: Callable[..., Cluster]
                                                    ) -> None:
    """As in QEMU, individual completion is per disk: an I/O error on h2/vm1/d1 aborts
    that disk alone; the other disks of the same agent and VM commit."""
    cluster = two_hosts(make_cluster, read_error=("d1",))
    base, since = prime(cluster)
    cluster.hosts["h2"].workloads["vm1"].arm_read_error("d1", 2)
    done = cluster.wait_done(cluster.start(TARGETS, completion=cpb.COMPLETION_INDIVIDUAL).txn_id)
    assert done.decision == cpb.DECISION_COMMIT, done.reason
    assert sorted(done.committed_agents) == ["h1", "h2"]
    failed = ("h2", "vm1", "d1")
    outcomes = {(m.agent_id, m.vm, m.disk): m.outcome for m in done.members}
    assert outcomes.pop(failed) == "aborted"
    assert set(outcomes.values()) == {"committed"}, outcomes
    assert "h2/vm1/d1" in done.reason, done.reason
    bset = cluster.any_stub().GetBackupSet(cpb.GetBackupSetRequest(set_id=done.set_id),
                                          timeout=10)
    assert {(i.agent_id, i.vm, i.disk) for i in bset.images} == set(outcomes)
    for host, vm, disk in all_disks(cluster):
        key = (host.agent.agent_id, vm, disk)
        bitmaps = host.bitmaps(vm, disk)
        if key == failed:  # kept its previous checkpoint with every write since
            assert set(bitmaps) == {f"blocktxn:{base}"}, bitmaps
            written = host.workloads[vm].clusters(disk, since[(host.agent.agent_id, vm)])
            assert bitmaps[f"blocktxn:{base}"]["count"] == len(written) * CLUSTER
        else:
            assert set(bitmaps) == {f"blocktxn:{done.txn_id}"}, (key, bitmaps)
        assert host.jobs(vm) == []
    images = {(i.vm, i.disk) for i in cluster.hosts["h2"].stub.ListImages(
        apb.ListImagesRequest(), timeout=10).images if i.set_id == done.txn_id}
    assert ("vm1", "d1") not in images and ("vm1", "d0") in images


def leader(cluster: Cluster) -> int:
    found = cluster.leader()
    assert found is not None
    return found


def test_leader_killed_while_running_another_replica_commits_once(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = two_hosts(make_cluster, replicas=2)
    prime(cluster)
    txn = cluster.start(TARGETS, speed=SLOW)
    wait_until(lambda: phase_of(cluster, txn.txn_id) == cpb.TXN_PHASE_RUNNING)
    first = leader(cluster)
    cluster.coordinators[first].kill()
    done = cluster.wait_done(txn.txn_id)
    assert done.decision == cpb.DECISION_COMMIT, done.reason
    assert leader(cluster) != first
    for host, vm, disk in all_disks(cluster):
        assert set(host.bitmaps(vm, disk)) == {f"blocktxn:{txn.txn_id}"}
    sets = cluster.any_stub().ListBackupSets(cpb.ListBackupSetsRequest(), timeout=10).sets
    assert sum(1 for s in sets if s.set_id == txn.txn_id) == 1


def test_a_deposed_leader_cannot_write(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(0)

    async def scenario() -> None:
        a, b = Store(cluster.etcd.endpoint), Store(cluster.etcd.endpoint)
        try:
            lease_a = await a.lease(5)
            epoch_a = await a.try_lead("a@x", lease_a)
            assert epoch_a is not None
            await a.resign(lease_a)             # A's lease is gone (as if it expired)
            epoch_b = await b.try_lead("b@y", await b.lease(5))
            assert epoch_b is not None and epoch_b != epoch_a
            record = TxnRecord("t1", "r1", "grouped", "none", 10.0, 0.0, 0, 0.0, (), ())
            with pytest.raises(NotLeaderError):
                await a.put_txn(epoch_a, record)
            with pytest.raises(NotLeaderError):
                await a.decide(DecisionRecord("t1", Decision.COMMIT, ""), epoch_a)
            assert await a.get_decision("t1") is None
            await b.put_txn(epoch_b, record)
            decided = await b.decide(DecisionRecord("t1", Decision.ABORT, ""), epoch_b)
            again = await b.decide(DecisionRecord("t1", Decision.COMMIT, ""), epoch_b)
            assert decided.decision == again.decision == Decision.ABORT  # single decision
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


OLD_RECORD = (  # as the coordinator wrote it before the typed records (no "images" key)
    '{"schema":1,"txn_id":"tx-old","request_id":"r-old","completion":"individual",'
    '"quiesce":"freeze","freeze_timeout":10.0,"deadline":1700003600.0,"speed":0,'
    '"created_at":1700000000.0,"members":[{"agent_id":"h1","vm":"vm1","disk":"d0",'
    '"mode":"auto","chosen":"full","mode_reason":"no checkpoint","status":"prepared",'
    '"done":4096,"total":4096,"outcome":"committed"}],"agents":{"h1":"127.0.0.1:1"},'
    '"phase":"decided","decision":"commit","reason":"","committed":["h1"],'
    '"votes":[{"agent_id":"h1","yes":true,"reason":""}],"errors":[],"frozen_from":1.5,'
    '"thawed_at":2.5,"set_id":"","leader":"c0"}')


async def leading_store(cluster: Cluster) -> tuple[Store, int]:
    """A store on the cluster's etcd that holds the leader key (epoch)."""
    store = Store(cluster.etcd.endpoint)
    epoch = await store.try_lead("a@x", await store.lease(5))
    assert epoch is not None
    return store, epoch


def test_records_round_trip_and_old_values_read_back(make_cluster: Callable[..., Cluster]
                                                      ) -> None:
    cluster = make_cluster(0)

    async def scenario() -> None:
        store, epoch = await leading_store(cluster)
        try:
            image = SetImage("h1", "vm1", "d0", "images/vm1/d0/t2.qcow2", "", "full", 4096,
                             1 << 20, "ab" * 32, 3.5, "blocktxn:t2")
            record = TxnRecord(
                "t2", "r2", "grouped", "freeze", 10.0, 99.0, 7, 1.0,
                (MemberRecord("h1", "vm1", "d0", "auto", "full", "why", "prepared", 4096,
                              4096, "committed"),), (("h1", "127.0.0.1:1"),),
                TxnPhase.DONE, Decision.COMMIT, "", ("h1",), (VoteRecord("h1", True),),
                ("e",), 1.5, 2.5, "t2", "c0", (image,))
            assert await store.create_txn(epoch, record) is None
            assert await store.create_txn(epoch, record) == "t2"   # the same request id
            bset = BackupSet.of("t2", (image,))
            await store.put_txn(epoch, record, bset)
            assert await store.get_txn("t2") == record
            assert await store.get_set("t2") == bset
            await store.client.put(f"{PREFIX}txn/tx-old".encode(), OLD_RECORD.encode())
            old = await store.get_txn("tx-old")
            assert old is not None and old.images == () and old.agents == (("h1",
                                                                             "127.0.0.1:1"),)
            assert (old.phase, old.decision, old.members[0].done) == (
                TxnPhase.DECIDED, Decision.COMMIT, 4096)
            for bad in (b"not json", b'{"schema":2}', b'{"schema":1,"txn_id":5}'):
                await store.client.put(f"{PREFIX}txn/tx-bad".encode(), bad)
                with pytest.raises(StoreCorruptError):
                    await store.get_txn("tx-bad")
            assert "tx-bad" not in {r.txn_id for r in await store.txns()}  # quarantined
            assert any(k.endswith("txn/tx-bad") for k in store.quarantined)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_deadline_presumes_abort_everywhere(make_cluster: Callable[..., Cluster]) -> None:
    cluster = two_hosts(make_cluster, replicas=2)
    base, since = prime(cluster)
    txn = cluster.start(TARGETS, speed=64 << 10, deadline_s=3)
    time.sleep(3.5)
    follower = 1 - leader(cluster)
    answer = cluster.stub(follower).QueryDecision(
        cpb.QueryDecisionRequest(txn_id=txn.txn_id), timeout=10)
    assert answer.decision == cpb.DECISION_ABORT and "deadline" in answer.reason
    done = cluster.wait_done(txn.txn_id)
    assert done.decision == cpb.DECISION_ABORT
    assert_kept(cluster, base, since)


def test_etcd_restarted_mid_transaction_loses_nothing(make_cluster: Callable[..., Cluster]
                                                      ) -> None:
    cluster = two_hosts(make_cluster)
    prime(cluster)
    txn = cluster.start(TARGETS, speed=SLOW)
    wait_until(lambda: phase_of(cluster, txn.txn_id) == cpb.TXN_PHASE_RUNNING)
    cluster.etcd.kill()
    time.sleep(1.0)
    cluster.etcd.start()
    done = cluster.wait_done(txn.txn_id)
    assert done.decision == cpb.DECISION_COMMIT, done.reason
    for host, vm, disk in all_disks(cluster):
        assert set(host.bitmaps(vm, disk)) == {f"blocktxn:{txn.txn_id}"}


@pytest.mark.parametrize("point,decision", [
    ("before_stage", cpb.DECISION_ABORT), ("before_cut", cpb.DECISION_ABORT),
    ("after_cut", cpb.DECISION_ABORT),
    ("after_thaw", cpb.DECISION_ABORT), ("after_decision", cpb.DECISION_COMMIT),
    ("after_commit_sent", cpb.DECISION_COMMIT),
])
def test_leader_crash_at_each_step_is_finished_by_the_next_leader(
    make_cluster: Callable[..., Cluster], point: str, decision: int,
) -> None:
    """The leader dies exactly at *point*; the other replica completes the transaction
    with one decision; an abort keeps every write, no guest stays frozen."""
    cluster = two_hosts(make_cluster, replicas=2,
                        first_env={"BLOCKTXN_FAILPOINTS": f"{point}=exit"})
    txn = cluster.start(TARGETS, quiesce=apb.QUIESCE_FREEZE, freeze_timeout_s=3)
    done = cluster.wait_done(txn.txn_id)
    assert cluster.coordinators[0].proc is not None
    assert cluster.coordinators[0].proc.poll() == 9          # it really died at the point
    assert done.decision == decision, done.reason
    assert leader(cluster) == 1
    for host in cluster.hosts.values():
        assert not any(ga.is_frozen for ga in host.gas.values())
        for s, e in (iv for ga in host.gas.values() for iv in ga.frozen_intervals):
            assert e - s < 3 + 1.5                           # bounded by the freeze deadline
    for host, vm, disk in all_disks(cluster):
        bitmaps = host.bitmaps(vm, disk)
        if decision == cpb.DECISION_COMMIT:
            assert set(bitmaps) == {f"blocktxn:{txn.txn_id}"}
        else:
            assert not any(txn.txn_id in b for b in bitmaps)
            assert host.jobs(vm) == []
            # staged targets (before_cut: every agent had staged) are gone too
            nodes = host.qmp(vm, "query-named-block-nodes", {"flat": True})
            assert not [n["node-name"] for n in nodes if n["node-name"].startswith("btx")]
            assert not list((host.agent.repo / "images").rglob(f"{txn.txn_id}*"))


def test_a_commit_one_agent_cannot_apply_yet_is_redelivered_and_the_set_waits_for_it(
    make_cluster: Callable[..., Cluster],
) -> None:
    """A durable COMMIT is delivered until every member agent has published: an agent
    that fails its Commit (here: it cannot write its catalog) is not counted as done,
    and no backup set is recorded with members missing."""
    cluster = two_hosts(make_cluster, first_env={"BLOCKTXN_FAILPOINTS": "after_decision=exit"})
    txn = cluster.start(TARGETS)
    first = cluster.coordinators[0]
    assert first.proc is not None
    wait_until(lambda: first.proc is not None and first.proc.poll() is not None, timeout=60,
               what="the leader's exit right after the durable decision")
    h2 = cluster.hosts["h2"]
    catalog = h2.agent.repo / "catalog.jsonl"
    assert not catalog.exists()
    catalog.mkdir()                           # h2 cannot catalog its images for now
    first.env = {}
    first.start()                             # the next leader resends the COMMIT

    def redelivered() -> bool:
        """h1 applied the resent COMMIT and h2's failure is recorded."""
        try:
            now = cluster.any_stub().GetTransaction(
                cpb.GetTransactionRequest(txn_id=txn.txn_id), timeout=10)
        except grpc.RpcError:  # still starting
            return False
        return bool(now.errors) and any(
            m.agent_id == "h1" and m.outcome == "committed" for m in now.members)

    # it leads once its dead self's lease (10 s) has lapsed, however late that is here
    wait_until(redelivered, timeout=90, what="the COMMIT redelivered to both agents")
    now = cluster.any_stub().GetTransaction(cpb.GetTransactionRequest(txn_id=txn.txn_id),
                                            timeout=10)
    assert now.decision == cpb.DECISION_COMMIT and now.phase == cpb.TXN_PHASE_DECIDED
    assert not now.set_id and now.errors
    outcomes = {m.agent_id: m.outcome for m in now.members}
    assert outcomes == {"h1": "committed", "h2": ""}
    catalog.rmdir()                           # h2 can publish again
    done = cluster.wait_done(txn.txn_id)
    assert done.set_id == txn.txn_id
    bset = cluster.any_stub().GetBackupSet(cpb.GetBackupSetRequest(set_id=done.set_id),
                                           timeout=10)
    assert {(i.agent_id, i.vm, i.disk) for i in bset.images} == {
        (h.agent.agent_id, vm, d) for h, vm, d in all_disks(cluster)}
    for host in cluster.hosts.values():  # each image's checksum follows the commit
        wait_until(lambda h=host: all(i.sha256 for i in h.stub.ListImages(
            apb.ListImagesRequest(), timeout=10).images), what="the catalog's checksums")


def test_a_corrupt_record_is_quarantined_not_fatal_to_leadership(
    make_cluster: Callable[..., Cluster],
) -> None:
    """One malformed value in etcd (a transaction, a set) must not stop every replica
    from leading: it is skipped with a clear error; everything else goes on."""
    cluster = two_hosts(make_cluster)

    async def plant() -> None:
        store = Store(cluster.etcd.endpoint)
        try:
            for key in ("txn/tx-bad", "set/tx-bad"):
                await store.client.put(f"{PREFIX}{key}".encode(), b'{"schema":1,"txn_id":5}')
        finally:
            await store.close()

    asyncio.run(plant())
    first = cluster.coordinators[0]
    first.kill()
    first.start()                                  # a new election reloads every record
    done = cluster.wait_done(cluster.start(TARGETS).txn_id)
    assert done.decision == cpb.DECISION_COMMIT, done.reason
    listed = cluster.any_stub().ListTransactions(cpb.ListTransactionsRequest(), timeout=10)
    assert [t.txn_id for t in listed.transactions] == [done.txn_id]
    sets = cluster.any_stub().ListBackupSets(cpb.ListBackupSetsRequest(), timeout=10)
    assert [s.set_id for s in sets.sets] == [done.txn_id]
    log = (first.workdir / f"{first.name}.log").read_text()
    assert "quarantined" in log and "tx-bad" in log


def test_an_etcd_request_that_can_never_succeed_is_not_retried(
    make_cluster: Callable[..., Cluster],
) -> None:
    """etcd refuses a value over its size limit: that is a rejection to report, not an
    outage to wait out (the driver retries only StoreUnavailableError)."""
    cluster = make_cluster(0)

    async def scenario() -> None:
        store, epoch = await leading_store(cluster)
        try:
            huge = TxnRecord("t3", "r3", "grouped", "none", 10.0, 99.0, 0, 1.0,
                             (MemberRecord("h1", "vm1", "d0", "auto",
                                           mode_reason="x" * (2 << 20)),),
                             (("h1", "127.0.0.1:1"),))
            t0 = time.monotonic()
            with pytest.raises(StoreRejectedError, match=r"larger than max|too large"):
                await store.create_txn(epoch, huge)
            assert time.monotonic() - t0 < 5
        finally:
            await store.close()

    asyncio.run(scenario())


def test_an_agent_in_doubt_asks_for_the_decision_itself(
    make_cluster: Callable[..., Cluster],
) -> None:
    """The COMMIT never reaches h2 (the leader died right after the durable decision,
    and h2 came back on another address than the transaction names): h2, prepared and
    hearing nothing, asks a replica for the decision and publishes by itself."""
    cluster = two_hosts(make_cluster, first_env={"BLOCKTXN_FAILPOINTS": "after_decision=exit"})
    txn = cluster.start(TARGETS)
    first = cluster.coordinators[0]
    wait_until(lambda: first.proc is not None and first.proc.poll() is not None, timeout=60,
               what="the leader's exit right after the durable decision")
    h2 = cluster.hosts["h2"]
    h2.kill_agent()
    h2.agent.port = free_port()                  # the record still names the old address
    # and it registers one nobody listens on: the COMMIT cannot reach it (else the
    # restarted leader may deliver it first, through the registry, under load)
    h2.agent.extra = [*h2.agent.extra, "--in-doubt-after", "2",
                      "--advertise", f"127.0.0.1:{free_port()}"]
    h2.start_agent()
    first.env = {}
    first.start()                                # h1 gets its COMMIT; h2's goes nowhere

    def published() -> set[tuple[str, str]]:
        images = h2.stub.ListImages(apb.ListImagesRequest(), timeout=10).images
        return {(i.vm, i.disk) for i in images if i.set_id == txn.txn_id}

    assert published() == set()                  # prepared, not committed
    wait_until(lambda: published() == {(vm, d) for vm, ds in VMS.items() for d in ds},
               timeout=60, what="h2 applies the COMMIT it asked for")
    log = (h2.agent.workdir / "agent.log").read_text()
    assert "in doubt: the durable decision is COMMIT" in log


def test_a_staged_transaction_no_replica_knows_is_rolled_back_by_the_agent(
    make_cluster: Callable[..., Cluster],
) -> None:
    """A Stage reached h1 for a transaction no replica knows (its coordinator's state is
    gone), and no Abort will ever come: h1 asks a replica about the transaction stuck
    staged, hears that it is unknown, and rolls it back; its disks are free again."""
    cluster = two_hosts(make_cluster)
    h1 = cluster.hosts["h1"]
    h1.kill_agent()
    # 5 s: the stage (a fresh watchdog's start included) is over and its images are
    # seen before h1 starts asking about the transaction
    h1.agent.extra = [*h1.agent.extra, "--in-doubt-after", "5"]
    h1.start_agent()
    h1.stub.Cut(apb.CutRequest(
        txn_id="forgotten", quiesce=apb.QUIESCE_FREEZE, freeze_timeout_s=10,
        stage_only=True, members=[apb.CutMember(vm="vm1", disk=d) for d in VMS["vm1"]]),
        timeout=60)
    staged = h1.agent.repo / "images"
    assert list(staged.glob("*/*/forgotten.qcow2"))
    wait_until(lambda: not list(staged.glob("*/*/forgotten.qcow2")), timeout=60,
               what="h1 rolls back the staged transaction no replica knows")
    vote = h1.stub.Prepare(apb.PrepareRequest(txn_id="forgotten", timeout_s=5), timeout=30)
    assert not vote.yes and "does not know" in vote.reason
    assert not h1.gas["vm1"].frozen_intervals          # it never froze anything
    done = cluster.wait_done(cluster.start(TARGETS).txn_id)
    assert done.decision == cpb.DECISION_COMMIT, done.reason


def test_a_start_whose_etcd_reply_was_lost_is_driven_to_an_end(
        make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    """The create of the record committed in etcd, but its reply was lost: the leader
    must not leave that record open without a driver (nor return it to a retry that
    then never moves). It is taken over and ends (aborted: its cut never ran); a retry
    with the same request id gets that transaction; the disks are free again."""
    armed = tmp_path / "failpoints"
    cluster = two_hosts(make_cluster, first_env={"BLOCKTXN_FAILPOINT_FILE": str(armed)})
    base, since = prime(cluster)
    armed.write_text("lose_create_reply=fail\n")
    with pytest.raises(grpc.RpcError) as lost:
        cluster.stub().StartTransaction(cpb.StartTransactionRequest(
            request_id="r-lost", targets=[cpb.Target(target=t) for t in TARGETS]), timeout=30)
    assert lost.value.code() == grpc.StatusCode.UNAVAILABLE, lost.value.details()
    armed.unlink()
    again = cluster.start(TARGETS, request_id="r-lost")
    done = cluster.wait_done(again.txn_id, timeout=30)
    assert done.decision == cpb.DECISION_ABORT and done.request_id == "r-lost"
    open_txns = cluster.stub().ListTransactions(
        cpb.ListTransactionsRequest(open_only=True), timeout=10).transactions
    assert list(open_txns) == []
    assert_kept(cluster, base, since)
    fresh = cluster.wait_done(cluster.start(TARGETS).txn_id)
    assert fresh.decision == cpb.DECISION_COMMIT, fresh.reason


def test_a_lost_start_reply_is_taken_over_without_a_retry(
        make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    armed = tmp_path / "failpoints"
    cluster = two_hosts(make_cluster, first_env={"BLOCKTXN_FAILPOINT_FILE": str(armed)})
    armed.write_text("lose_create_reply=fail\n")
    with pytest.raises(grpc.RpcError):
        cluster.stub().StartTransaction(cpb.StartTransactionRequest(
            targets=[cpb.Target(target=t) for t in TARGETS]), timeout=30)
    armed.unlink()

    def none_open() -> bool:
        txns = cluster.stub().ListTransactions(cpb.ListTransactionsRequest(), timeout=10)
        return len(txns.transactions) == 1 and txns.transactions[0].phase == cpb.TXN_PHASE_DONE

    wait_until(none_open, timeout=30, what="the orphaned record to end")


def test_an_agent_back_on_a_new_address_gets_the_decision_there(
        make_cluster: Callable[..., Cluster]) -> None:
    """An agent that restarts on another address after voting (a new port, a moved
    host) re-registers; the coordinator delivers the durable COMMIT to the address it
    registered last, not only to the one in the transaction record."""
    cluster = two_hosts(make_cluster)
    h2 = cluster.hosts["h2"]
    flag = h2.workdir / "failpoints"
    h2.agent.env = {"BLOCKTXN_FAILPOINT_FILE": str(flag)}
    h2.restart_agent()
    cluster.wait_registered(2)
    flag.write_text("agent_commit=fail\n")  # h2 votes YES, then refuses the COMMIT
    txn = cluster.start(TARGETS)
    wait_until(lambda: cluster.any_stub().GetTransaction(cpb.GetTransactionRequest(
        txn_id=txn.txn_id), timeout=10).decision == cpb.DECISION_COMMIT, timeout=60,
        what="the COMMIT decision")
    h2.kill_agent()
    flag.unlink()
    h2.agent.port = free_port()  # back on a new address
    h2.start_agent()
    done = cluster.wait_done(txn.txn_id, timeout=60)
    assert done.decision == cpb.DECISION_COMMIT
    assert {m.outcome for m in done.members} == {"committed"}
    assert len(cluster.any_stub().GetBackupSet(cpb.GetBackupSetRequest(
        set_id=done.set_id), timeout=10).images) == 6
