"""Liveness tells busy from dead (issue #16): an agent whose QEMU does not answer, or a
coordinator whose event loop is stuck in transaction work for several seconds, loses
nothing — no agent declared lost, no leadership — while a stopped agent is declared
lost within LOST_AFTER of its last heartbeat."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

from blocktxn.coordinator.election import LEASE_TTL, Election
from blocktxn.coordinator.etcd_server import EtcdServer
from blocktxn.coordinator.keepalive import LeaseKeeper
from blocktxn.coordinator.records import AgentInventory
from blocktxn.coordinator.registry import LOST_AFTER, AgentRegistry
from blocktxn.coordinator.store import Store
from blocktxn.failpoints import BLOCK
from blocktxn.tls import TlsFiles
from blocktxn.v1 import coordinator_pb2 as cpb
from tests.integration.cluster import Cluster
from tests.integration.harness import wait_until

VMS = {"vm1": ["d0", "d1"]}
#: a stall of the coordinator's loop longer than the leader lease's TTL
STALL = LEASE_TTL + 1


def live(cluster: Cluster) -> dict[str, bool]:
    listed = cluster.stub(0).ListAgents(cpb.ListAgentsRequest(), timeout=10).agents
    return {a.agent_id: a.live for a in listed}


def test_a_stalled_coordinator_loop_keeps_its_leadership_and_its_agents_live(
    tmp_path: Path,
) -> None:
    """The replica's loop blocks for STALL s (as a long synchronous step of
    transaction work would): the keeper's thread keeps the leader's lease alive past its
    TTL and refreshes the agent's lease meanwhile, so the same epoch still leads and
    the agent is still live."""
    etcd = EtcdServer(tmp_path / "etcd")
    etcd.start()

    async def run() -> None:
        store = Store(etcd.endpoint)
        keeper = LeaseKeeper(lambda: Store(etcd.endpoint))
        keeper.start()
        elected = asyncio.Event()

        async def on_elected() -> None:
            elected.set()

        election = Election(store, keeper, "c0", "c0@127.0.0.1:1", on_elected, lambda: None)
        registry = AgentRegistry(store, TlsFiles(), keeper)
        try:
            election.start()
            await asyncio.wait_for(elected.wait(), 10)
            epoch = election.epoch
            await registry.register("h1", "127.0.0.1:2", AgentInventory("h1"), "d1")
            time.sleep(STALL)  # noqa: ASYNC251 - the point: the loop is blocked
            await asyncio.sleep(0.1)
            assert election.epoch == epoch
            leader = await store.leader()
            assert leader is not None and leader[1] == epoch
            leases = await store.live_leases()
            assert "h1" in leases
            # refreshed by the keeper during the stall (AGENT_TTL outlasts it anyway)
            age = await store.lease_age(leases["h1"])
            assert age is not None and age < STALL - 3, age
            assert await registry.heartbeat("h1", "127.0.0.1:2", "d1")
        finally:
            await election.stop()
            await registry.close()
            keeper.stop()
            await store.close()

    try:
        asyncio.run(run())
    finally:
        etcd.stop()


def test_an_agent_whose_qemu_hangs_stays_live_and_a_stopped_agent_is_lost_in_time(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(1)
    h1 = cluster.add_host("h1", VMS)
    h2 = cluster.add_host("h2", VMS)
    armed = h1.workdir / "failpoints"
    h1.agent.env = {"BLOCKTXN_FAILPOINT_FILE": str(armed)}
    h1.restart_agent()
    cluster.wait_registered(2)

    # h1's QEMU stops answering, and h1's own event loop is held up by synchronous work
    # (a failpoint), both for longer than an agent may stay silent: its heartbeats
    # never wait for QEMU and go from a thread of their own, so h1 stays live
    qsd = h1.vms["vm1"].proc
    assert qsd is not None
    qsd.send_signal(signal.SIGSTOP)
    armed.write_text("agent_inventory=block\n")
    blocked = h1.agent.workdir / "agent.log"
    try:
        wait_until(lambda: "failpoint agent_inventory: blocking" in blocked.read_text(),
                   timeout=10, what="h1's loop blocked")
        armed.unlink()  # (the block under way goes on for BLOCK s)
        end = time.monotonic() + min(LOST_AFTER + 2, BLOCK - 2)
        while time.monotonic() < end:
            assert live(cluster)["h1"], "h1 declared lost while its QEMU and loop hang"
            time.sleep(1)
    finally:
        qsd.send_signal(signal.SIGCONT)

    # h2's agent itself stops: lost within LOST_AFTER (+ a listing's slack)
    agent = h2.agent.proc
    assert agent is not None
    agent.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_until(lambda: not live(cluster)["h2"], timeout=LOST_AFTER + 5, what="h2 lost")
        assert time.monotonic() - stopped <= LOST_AFTER + 5
        assert live(cluster)["h1"]
    finally:
        agent.send_signal(signal.SIGCONT)
    wait_until(lambda: live(cluster)["h2"], timeout=15, what="h2 live again")
