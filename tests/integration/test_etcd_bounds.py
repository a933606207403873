"""etcd stays small for a year of unattended running: idle heartbeats write nothing,
finished transaction records are collected (backup sets stay), every listing reads
in pages, and a full etcd (NOSPACE alarm) is reported and waited out."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import aetcd.exceptions
import grpc
import pytest
from aetcd.utils import prefix_range_end
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blocktxn.coordinator.encoding import dump as _dump
from blocktxn.coordinator.errors import NotLeaderError, StoreFullError
from blocktxn.coordinator.etcd_server import EtcdServer
from blocktxn.coordinator.planner import txn_id_at
from blocktxn.coordinator.records import (
    AgentInventory,
    AuditRecord,
    BackupSet,
    DecisionRecord,
    DiskEntry,
    MemberRecord,
    SetImage,
    TxnRecord,
    VmEntry,
)
from blocktxn.coordinator.registry import FREE_SLACK, LOST_AFTER, same_inventory
from blocktxn.coordinator.store import PREFIX, Store, parse_endpoints
from blocktxn.coordinator.txn_messages import Decision, TxnPhase
from blocktxn.coordinator.upkeep import REASON_KEY, parse_keep
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb
from tests.integration.cluster import Cluster, CoordinatorProcess
from tests.integration.harness import wait_until
from tests.integration.test_cli import cli
from tests.integration.test_coordinator_faults import leading_store

VMS = {"vm1": ["d0"], "vm2": ["d0"]}


def etcd_revision(cluster: Cluster) -> int:
    async def ask() -> int:
        store = Store(cluster.etcd.endpoint)
        try:
            return (await store.status()).revision
        finally:
            await store.close()

    return asyncio.run(ask())


def etcd_keys(cluster: Cluster) -> list[str]:
    async def ask() -> list[str]:
        store = Store(cluster.etcd.endpoint)
        try:
            start = PREFIX.encode()
            return [bytes(kv.key).decode()[len(PREFIX):]
                    for kv in await store._range("keys", start, prefix_range_end(start))]
        finally:
            await store.close()

    return asyncio.run(ask())


def with_coordinator(make_cluster: Callable[..., Cluster], *flags: str, quota: int = 0
                     ) -> Cluster:
    """A cluster whose one replica c0 runs with *flags*, on an etcd with *quota*."""
    cluster = make_cluster(0)
    if quota:
        cluster.etcd.stop()
        cluster.etcd = EtcdServer(cluster.workdir / "etcd-quota", quota=quota)
        cluster.etcd.start()
    c0 = CoordinatorProcess("c0", cluster.workdir / "c0", cluster.etcd.endpoint,
                            extra=list(flags))
    cluster.coordinators.append(c0)
    c0.start()
    return cluster


def agents(cluster: Cluster, replica: int = 0) -> dict[str, cpb.AgentEntry]:
    listed = cluster.stub(replica).ListAgents(cpb.ListAgentsRequest(), timeout=10).agents
    return {a.agent_id: a for a in listed}


def checkpoint(cluster: Cluster, agent_id: str, replica: int = 0) -> str:
    vm = next(v for v in agents(cluster, replica)[agent_id].inventory.vms if v.name == "vm1")
    return str(vm.disks[0].checkpoint)


def test_idle_agents_cost_etcd_no_revision_and_a_change_is_written(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(2)      # the agents heartbeat to c0; c1 hears none of them
    cluster.add_host("h1", VMS)
    cluster.add_host("h2", VMS)
    cluster.wait_registered(2)
    time.sleep(4)                  # every agent has registered (and written) once
    before = etcd_revision(cluster)
    time.sleep(10)                 # three heartbeats of each agent, lease keepalives
    assert etcd_revision(cluster) - before <= 1
    for replica in (0, 1):         # c1: last_seen from the agent's lease
        listed = agents(cluster, replica)
        now = time.time()
        assert {a for a, e in listed.items() if e.live} == {"h1", "h2"}
        # fresh: within two heartbeats (3 s) and a lease refresh (2.5 s), plus slack
        assert all(now - 10 < e.last_seen <= now + 1 for e in listed.values()), listed

    # a change is written: the new checkpoint after a backup, seen by every replica
    assert checkpoint(cluster, "h1") == ""
    done = cluster.wait_done(cluster.start(["h1/vm1"]).txn_id)
    assert done.decision == cpb.DECISION_COMMIT, done.reason
    for replica in (0, 1):
        wait_until(lambda r=replica: done.txn_id in checkpoint(cluster, "h1", r),
                   timeout=15, what="the new checkpoint in the registry")
    time.sleep(4)
    before = etcd_revision(cluster)
    time.sleep(6)
    assert etcd_revision(cluster) - before <= 1

    # a lost agent: not live on any replica once its lease runs out; last seen stays
    killed = time.time()
    cluster.hosts["h2"].kill_agent()
    for replica in (0, 1):
        wait_until(lambda r=replica: not agents(cluster, r)["h2"].live,
                   timeout=LOST_AFTER + 5, what="h2 lost")
    assert killed - 5 < agents(cluster, 0)["h2"].last_seen <= killed + 1
    assert agents(cluster, 1)["h2"].last_seen <= killed + 1
    assert agents(cluster, 0)["h1"].live and agents(cluster, 1)["h1"].live


def test_finished_records_leave_etcd_and_backup_sets_stay(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = with_coordinator(make_cluster, "--keep-finished", "3s")
    cluster.add_host("h1", VMS)
    cluster.wait_registered(1)
    committed = cluster.wait_done(cluster.start(["h1/vm1"], request_id="keep-1").txn_id)
    assert committed.decision == cpb.DECISION_COMMIT, committed.reason
    slow = cluster.start(["h1/vm2"], speed=64 << 10, request_id="keep-2")
    cluster.stub().CancelTransaction(cpb.CancelTransactionRequest(txn_id=slow.txn_id),
                                     timeout=30)
    aborted = cluster.wait_done(slow.txn_id)
    assert aborted.decision == cpb.DECISION_ABORT
    ids = (committed.txn_id, aborted.txn_id)

    def gone(txn_id: str) -> bool:
        try:
            cluster.stub().GetTransaction(cpb.GetTransactionRequest(txn_id=txn_id), timeout=10)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND, err
            return True
        return False

    wait_until(lambda: all(gone(i) for i in ids), timeout=30, what="records collected")
    left = [k for k in etcd_keys(cluster) if any(i in k for i in ids)]
    # no txn, member, decision, request key: the set (header and part) only
    assert sorted(left) == [f"image/{committed.txn_id}/h1", f"set/{committed.txn_id}"], left
    assert not [k for k in etcd_keys(cluster) if k.startswith("request/")]
    stub = cluster.stub()
    assert [s.set_id for s in stub.ListBackupSets(cpb.ListBackupSetsRequest(),
                                                  timeout=10).sets] == [committed.txn_id]
    assert stub.GetBackupSet(cpb.GetBackupSetRequest(set_id=committed.txn_id),
                             timeout=10).images
    assert stub.ListTransactions(cpb.ListTransactionsRequest(), timeout=10).transactions == []
    shown = cli(cluster, "txn", "show", committed.txn_id)
    assert shown.returncode == 2, shown
    assert len(shown.stderr.strip().splitlines()) == 1 and "unknown transaction" in shown.stderr
    with pytest.raises(grpc.RpcError) as err:   # no presumed abort for a collected record
        cluster.stub().QueryDecision(cpb.QueryDecisionRequest(txn_id=aborted.txn_id),
                                     timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert not [k for k in etcd_keys(cluster) if k.startswith("decision/")]
    # the next backup is still an incremental on the kept set
    again = cluster.wait_done(cluster.start(["h1/vm1"]).txn_id)
    assert again.decision == cpb.DECISION_COMMIT, again.reason
    assert {m.mode for m in again.members} == {apb.BACKUP_MODE_INCREMENTAL}


def _record(txn_id: str, created: float, phase: TxnPhase, size: int = 0) -> TxnRecord:
    return TxnRecord(txn_id, f"r-{txn_id}", "grouped", "none", 10.0, created + 60, 0, created,
                     (MemberRecord("h1", "vm1", "d0", "auto", mode_reason="x" * size),),
                     (("h1", "127.0.0.1:1"),), phase=phase,
                     decision=Decision.COMMIT if phase == TxnPhase.DONE else None)


async def _put_all(store: Store, items: list[tuple[bytes, bytes]]) -> None:
    for i in range(0, len(items), 100):
        ok, _ = await store.client.transaction(compare=[], success=[
            store.tx.put(k, v) for k, v in items[i:i + 100]], failure=[])
        assert ok


def test_collection_is_fenced_bounded_and_leaves_open_and_new_records(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(0)

    async def scenario() -> None:
        store, epoch = await leading_store(cluster)
        try:
            old, now = time.time() - 7200, time.time()
            records = ([_record(txn_id_at(old, i), old, TxnPhase.DONE) for i in range(80)]
                       + [_record(txn_id_at(old, 100 + i), old, TxnPhase.RUNNING)
                          for i in range(5)]
                       + [_record(txn_id_at(now, 200 + i), now, TxnPhase.DONE)
                          for i in range(5)])
            items = []
            for r in records:
                items += [(f"{PREFIX}txn/{r.txn_id}".encode(), _dump(r)),
                          (f"{PREFIX}request/{r.request_id}".encode(), r.txn_id.encode()),
                          (f"{PREFIX}decision/{r.txn_id}".encode(), _dump(DecisionRecord(
                              r.txn_id, Decision.COMMIT, "ok")))]
                items.append((f"{PREFIX}set/{r.txn_id}".encode(), _dump(BackupSet.of(
                    r.txn_id, (SetImage("h1", "vm1", "d0", "i", "", "full", 1, 1, "00", old,
                                        "c"),)))))
            await _put_all(store, items)
            before = (await store.status()).revision
            assert await store.collect_finished(epoch, now - 3600, limit=10) == 10
            assert (await store.status()).revision == before + 1      # one batch
            with pytest.raises(NotLeaderError):                       # fenced
                await store.collect_finished(epoch + 1000, now - 3600)
            assert await store.collect_finished(epoch, now - 3600) == 70  # three batches
            assert (await store.status()).revision == before + 4
            assert await store.collect_finished(epoch, now - 3600) == 0
            left = {r.txn_id: r.phase for r in await store.txns()}
            assert sorted(left) == sorted(r.txn_id for r in records[80:])
            assert len(await store.sets()) == 90                     # every set stays
            for r in records:
                kept = r.txn_id in left
                assert (await store.get_decision(r.txn_id) is not None) == kept
                assert (await store.client.get(
                    f"{PREFIX}request/{r.request_id}".encode()) is not None) == kept
        finally:
            await store.close()

    asyncio.run(scenario())


class _CompactingStore(Store):
    """Compacts etcd past the listing's revision once, before its second page."""

    compacted = False

    async def _page(self, key: bytes, end: bytes, revision: int, page: int) -> Any:
        if revision and not self.compacted:
            self.compacted = True
            await self.client.put(b"/elsewhere", b"x")
            await self.client.compact((await self.status()).revision, physical=True)
        return await super()._page(key, end, revision, page)


def test_collection_takes_a_records_parts_and_parts_never_given_a_header(
    make_cluster: Callable[..., Cluster],
) -> None:
    """A collected record leaves no part behind; the parts of a creation that stopped
    before its header (an hour or more ago) go too; the parts of a creation that may
    still be under way, or of a record that stays, are left."""
    from blocktxn.coordinator.parts import split_txn

    cluster = make_cluster(0)

    async def scenario() -> None:
        store, epoch = await leading_store(cluster)
        try:
            now = time.time()
            old = _record(txn_id_at(now - 7200, 1), now - 7200, TxnPhase.DONE)
            kept = _record(txn_id_at(now - 7100, 2), now - 7100, TxnPhase.RUNNING)
            for r in (old, kept):
                assert await store.create_txn(epoch, r) is None
            stray_old, stray_new = (_record(txn_id_at(now - s, 3), now - s, TxnPhase.CUTTING)
                                    for s in (5400, 60))
            await _put_all(store, [(f"{PREFIX}member/{r.txn_id}/{a}".encode(), _dump(p))
                                   for r in (stray_old, stray_new)
                                   for a, p in split_txn(r)[1].items()])
            assert await store.collect_finished(epoch, now - 10) == 1
            start = PREFIX.encode()
            keys = [bytes(kv.key).decode()[len(PREFIX):]
                    for kv in await store._range("keys", start, prefix_range_end(start))]
            assert sorted(k for k in keys if k.startswith(("txn/", "member/"))) == [
                f"member/{kept.txn_id}/h1", f"member/{stray_new.txn_id}/h1",
                f"txn/{kept.txn_id}"]
            assert await store.get_txn(kept.txn_id) == kept
        finally:
            await store.close()

    asyncio.run(scenario())


def test_listings_read_in_pages_past_grpc_message_limit(
    make_cluster: Callable[..., Cluster],
) -> None:
    """3,000 records of 2 KiB (6 MiB, over gRPC's 4 MiB) list whole in pages of 100."""
    cluster = make_cluster(0)

    async def scenario() -> None:
        store = Store(cluster.etcd.endpoint, page=100)
        try:
            now = time.time()
            records = [_record(txn_id_at(now, i), now, TxnPhase.DONE, size=2048)
                       for i in range(3000)]
            await _put_all(store, [(f"{PREFIX}txn/{r.txn_id}".encode(), _dump(r))
                                   for r in records])
            plain = aetcd.Client(*parse_endpoints(cluster.etcd.endpoint))  # gRPC's limit
            try:
                with pytest.raises(aetcd.exceptions.ClientError, match="larger than max"):
                    await plain.get_prefix(f"{PREFIX}txn/".encode())  # one range: too big
            finally:
                await plain.close()
            listed = await store.txns()
            assert sorted(r.txn_id for r in listed) == sorted(r.txn_id for r in records)
            assert listed == sorted(records, key=lambda r: r.txn_id)
            default = Store(cluster.etcd.endpoint)                  # pages of 500 (1 MiB)
            try:
                assert len(await default.txns()) == 3000
            finally:
                await default.close()
            compacting = _CompactingStore(cluster.etcd.endpoint, page=1000)
            try:       # the pinned revision compacted between pages: read again, whole
                assert len(await compacting.txns()) == 3000 and compacting.compacted
            finally:
                await compacting.close()
        finally:
            await store.close()

    asyncio.run(scenario())


def _health(cluster: Cluster) -> tuple[int, str]:
    """The coordinator's health status and the reason it gives."""
    ch = grpc.insecure_channel(cluster.coordinators[0].address)
    try:
        reply, call = health_pb2_grpc.HealthStub(ch).Check.with_call(
            health_pb2.HealthCheckRequest(service=""), timeout=10)
        reason = dict(call.trailing_metadata() or ()).get(REASON_KEY, "")
        return int(reply.status), str(reason)
    finally:
        ch.close()


async def _fill(endpoint: str) -> None:
    """Write until etcd raises its NOSPACE alarm."""
    store = Store(endpoint)
    try:
        with pytest.raises(StoreFullError):
            for _ in range(1000):
                await store._call("fill", lambda: store.client.put(b"/junk", b"j" * (256 << 10)))
    finally:
        await store.close()


async def _repair(endpoint: str) -> None:
    """What an operator does: free space, compact, defragment, disarm the alarm
    (``etcdctl del``, ``compact``, ``defrag``, ``alarm disarm``)."""
    store = Store(endpoint)
    try:
        await store.client.delete(b"/junk")
        await store.client.compact((await store.status()).revision, physical=True)
        await store.client.defragment()
        for alarm in [a async for a in store.client.list_alarms()]:
            await store.client.disarm_alarm(alarm.member_id)
    finally:
        await store.close()


def test_a_full_etcd_is_reported_and_a_pending_write_completes_after_repair(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = with_coordinator(make_cluster, quota=8 << 20)
    cluster.add_host("h1", VMS)
    cluster.wait_registered(1)
    assert _health(cluster) == (health_pb2.HealthCheckResponse.SERVING, "")
    base = cluster.wait_done(cluster.start(["h1/vm1"]).txn_id)
    assert base.decision == cpb.DECISION_COMMIT, base.reason
    for c in range(32):     # 2 MiB: QEMU copies the first MiB at once, then 128 KiB/s
        cluster.hosts["h1"].workloads["vm1"].write("d0", c)
    txn = cluster.start(["h1/vm1"], speed=128 << 10)
    wait_until(lambda: cluster.stub().GetTransaction(cpb.GetTransactionRequest(
        txn_id=txn.txn_id), timeout=10).phase == cpb.TXN_PHASE_RUNNING, what="running")
    asyncio.run(_fill(cluster.etcd.endpoint))

    wait_until(lambda: _health(cluster)[0] == health_pb2.HealthCheckResponse.NOT_SERVING,
               timeout=15, what="health NOT_SERVING")
    assert "NOSPACE" in _health(cluster)[1]
    with pytest.raises(grpc.RpcError) as err:               # a new transaction: retry later
        cluster.stub().StartTransaction(cpb.StartTransactionRequest(
            targets=[cpb.Target(target="h1/vm2")]), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "etcd is full" in (err.value.details() or "")
    log = cluster.coordinators[0].workdir / "c0.log"
    retrying = re.compile(r"retrying: etcd (decide|put txn): etcd is full")
    wait_until(lambda: retrying.search(log.read_text()) is not None, timeout=60,
               what="the decision write refused and retried")
    first = len(retrying.findall(log.read_text()))
    time.sleep(6)
    retries = len(retrying.findall(log.read_text())) - first
    assert 1 <= retries <= 10, retries                     # backoff: not a tight loop
    assert cluster.stub().GetTransaction(cpb.GetTransactionRequest(txn_id=txn.txn_id),
                                         timeout=10).phase != cpb.TXN_PHASE_DONE

    asyncio.run(_repair(cluster.etcd.endpoint))
    done = cluster.wait_done(txn.txn_id, timeout=60)         # the pending write went in
    assert done.decision == cpb.DECISION_COMMIT, done.reason
    wait_until(lambda: _health(cluster) == (health_pb2.HealthCheckResponse.SERVING, ""),
               timeout=15, what="health SERVING again")
    errors = [line for line in log.read_text().splitlines() if " ERROR " in line]
    assert len([e for e in errors if "NOT_SERVING" in e and "NOSPACE" in e]) == 1, errors


@pytest.mark.parametrize(("text", "seconds"), [("604800", 604800.0), ("7d", 604800.0),
                                               ("12h", 43200.0), ("90s", 90.0),
                                               ("1w", 604800.0), ("2.5h", 9000.0)])
def test_keep_finished_takes_seconds_or_a_duration(text: str, seconds: float) -> None:
    assert parse_keep(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "7m", "-1d", "3651d", "1d2h", "soon"])
def test_keep_finished_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="keep-finished"):
        parse_keep(text)


def test_free_space_counts_as_changed_only_past_its_slack() -> None:
    stored = AgentInventory("h1", (), (), 256 << 30, 100 << 30)
    step = (256 << 30) // FREE_SLACK
    assert same_inventory(stored, replace(stored, repo_free=(100 << 30) + step))
    assert same_inventory(stored, replace(stored, repo_free=(100 << 30) - step))
    assert not same_inventory(stored, replace(stored, repo_free=(100 << 30) - step - 1))
    # what comes and goes with every transaction is not written; a new checkpoint is
    assert same_inventory(stored, replace(stored, open_transactions=("tx-1",)))
    disk = DiskEntry("d0", 1 << 30, "qcow2", "blocktxn:tx-0", True)
    with_vm = replace(stored, vms=(VmEntry("vm1", True, (disk,)),))
    busy = replace(with_vm, vms=(VmEntry("vm1", True, (replace(disk, busy_txn="tx-1"),),
                                         jobs=("btxjob",), frozen=True),))
    assert same_inventory(with_vm, busy)
    moved = replace(with_vm, vms=(VmEntry("vm1", True, (
        replace(disk, checkpoint="blocktxn:tx-1"),)),))
    assert not same_inventory(with_vm, moved)
    assert not same_inventory(with_vm, replace(with_vm, vms=(VmEntry("vm1", False, (disk,)),)))


def _wide_record(hosts: int, disks_per_host: int, name_len: int = 0) -> TxnRecord:
    """A transaction over *hosts* agents with *disks_per_host* disks each; ids padded to
    *name_len* characters (64 is the longest an id may be)."""
    def pad(text: str) -> str:
        return text + "x" * max(0, name_len - len(text))

    agents = [pad(f"s{h:03d}") for h in range(hosts)]
    members = tuple(MemberRecord(a, pad(f"vm{d // 2}"), pad(f"d{d % 2}"), "auto")
                    for a in agents for d in range(disks_per_host))
    now = time.time()
    return TxnRecord(txn_id_at(now, 7), "r-wide", "grouped", "freeze", 10.0, now + 3600, 0,
                     now, members, tuple((a, f"10.0.{i // 250}.{i % 250}:7401")
                                         for i, a in enumerate(agents)), group="web")


VALUE_MOST = 64 << 10      # the scale issue's bound on every etcd value
REQUEST_MOST = 1 << 20     # ... and on every etcd request (this test's etcd refuses more)


def test_a_transaction_of_10000_disks_on_1000_agents_is_decided_in_small_values(
        make_cluster: Callable[..., Cluster]) -> None:
    """Nothing in etcd grows with a transaction: a record of 10,000 disks on 1,000 agents
    is kept as a header and one part per agent (coordinator/parts.py). On an etcd that
    refuses any request over 1 MiB it is created, a vote rewrites its agent's part and
    the header only, the decision is one small create-if-absent write, the final record
    and its backup set (every free text at its bound) are written and read back whole,
    and no value under the prefix passes 64 KiB. A transaction one of whose agents'
    share could never fit one request is refused up front (final_write_bound)."""
    from blocktxn.coordinator.encoding import (
        final_write_bound,
        largest_value_bound,
        worst_final_write,
    )
    from blocktxn.coordinator.errors import StoreRejectedError
    from blocktxn.coordinator.records import VoteRecord
    from blocktxn.coordinator.store import ETCD_MAX_REQUEST, REQUEST_MARGIN

    wide = _wide_record(1000, 10, name_len=16)
    assert final_write_bound(wide) <= REQUEST_MOST
    assert largest_value_bound(wide) <= VALUE_MOST
    too_wide = _wide_record(1, 2000, name_len=64)  # one agent's share over 1.5 MiB
    assert final_write_bound(too_wide) > ETCD_MAX_REQUEST - REQUEST_MARGIN
    cluster = make_cluster(0)
    cluster.etcd.stop()
    cluster.etcd = EtcdServer(cluster.workdir / "etcd-1mib", max_request=REQUEST_MOST)
    cluster.etcd.start()

    async def scenario() -> None:
        store = Store(cluster.etcd.endpoint)
        epoch = await store.try_lead("a@x", await store.lease(120))
        assert epoch is not None
        try:
            assert await store.create_txn(epoch, wide) is None
            assert await store.get_txn(wide.txn_id) == wide
            # one agent votes: its part and the header, in one revision
            voter = wide.agent_ids[500]
            voted = replace(wide, phase=TxnPhase.RUNNING,
                            votes=(VoteRecord(voter, True, "ok", 1e9),))
            await store.put_txn(epoch, voted)
            revision = (await store.status()).revision
            start = PREFIX.encode()
            kvs = await store._range("all", start, prefix_range_end(start))
            assert {bytes(kv.key).decode()[len(PREFIX):] for kv in kvs
                    if kv.mod_revision == revision} == {
                f"txn/{wide.txn_id}", f"member/{wide.txn_id}/{voter}"}
            assert await store.get_txn(wide.txn_id) == voted
            decision = DecisionRecord(wide.txn_id, Decision.COMMIT, "all voted yes",
                                      wide.agent_ids, 1e9, "a@x")
            assert await store.decide(decision, epoch) == decision
            final, backup_set = worst_final_write(wide)
            await store.put_txn(epoch, final, backup_set)   # etcd takes every request
            assert await store.get_txn(wide.txn_id) == replace(
                final, votes=tuple(sorted(final.votes, key=lambda v: (v.at, v.agent_id))))
            assert await store.get_set(wide.txn_id) == backup_set
            assert [s.set_id for s in await store.sets()] == [backup_set.set_id]
            kvs = await store._range("all", start, prefix_range_end(start))
            largest = max(kvs, key=lambda kv: len(kv.value))
            assert len(largest.value) <= VALUE_MOST, bytes(largest.key)
            assert len(await store._range("all", start, prefix_range_end(start))) > 2000
            final, backup_set = worst_final_write(too_wide)
            with pytest.raises(StoreRejectedError):          # what the refusal avoids
                await store.put_txn(epoch, final, backup_set)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_audit_records_leave_etcd_by_age_and_by_count(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(0)

    async def scenario() -> None:
        store, epoch = await leading_store(cluster)
        try:
            now = time.time()
            ages = [now - 3 * 86400 + i for i in range(10)] + [now - 60 + i for i in range(30)]
            for at in ages:
                await store.put_audit(AuditRecord(at, "ops", "operator", "StartTransaction",
                                                  "{}", "OK"))
            assert len(await store.audit(0, 1000)) == 40
            # older than a day: the first 10 go; then only the newest 25 of the rest stay
            assert await store.collect_audit(epoch, now - 86400, 25) == 15
            kept = await store.audit(0, 1000)
            assert [r.at for r in kept] == pytest.approx(ages[15:])
            assert [r.at for r in await store.audit(ages[-10] - 0.5, 1000)] == pytest.approx(
                ages[-10:])
            assert len(await store.audit(0, 3)) == 3
            assert await store.collect_audit(epoch, now - 86400, 25) == 0
        finally:
            await store.close()

    asyncio.run(scenario())
