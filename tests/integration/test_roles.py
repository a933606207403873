"""Roles from client certificates and the audit trail, on a real cluster over mutual
TLS: a reader cannot back up, an agent cannot register as another, only coordinators
call agents, denied calls change nothing, and every mutating call is audited once with
the caller's identity, also when a follower forwards it to the leader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import agent_pb2_grpc
from blocktxn.v1 import coordinator_pb2 as cpb
from blocktxn.v1 import coordinator_pb2_grpc as cpb_grpc
from tests.integration.cluster import Cluster
from tests.integration.harness import Host, wait_until
from tests.integration.pki import make_certs

NAMES = ("coord", "h1", "h2", "ops", "alice", "mallory")


def tls_flags(pki: Path, name: str) -> list[str]:
    return ["--tls-cert", str(pki / f"{name}.crt"), "--tls-key", str(pki / f"{name}.key"),
            "--tls-ca", str(pki / "ca.crt")]


class As:
    """Calls made with one identity's client certificate."""

    def __init__(self, pki: Path, name: str) -> None:
        self.pki, self.name = pki, name
        self.creds = grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes(),
                                                  (pki / f"{name}.key").read_bytes(),
                                                  (pki / f"{name}.crt").read_bytes())
        self.channels: list[grpc.Channel] = []

    def coordinator(self, address: str) -> cpb_grpc.CoordinatorServiceStub:
        ch = grpc.secure_channel(address, self.creds)
        self.channels.append(ch)
        return cpb_grpc.CoordinatorServiceStub(ch)

    def agent(self, address: str) -> agent_pb2_grpc.AgentServiceStub:
        ch = grpc.secure_channel(address, self.creds)
        self.channels.append(ch)
        return agent_pb2_grpc.AgentServiceStub(ch)

    def cli(self, address: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "BLOCKTXN_TLS_CERT": str(self.pki / f"{self.name}.crt"),
               "BLOCKTXN_TLS_KEY": str(self.pki / f"{self.name}.key"),
               "BLOCKTXN_TLS_CA": str(self.pki / "ca.crt")}
        return subprocess.run([sys.executable, "-m", "blocktxn", "--coordinator", address,
                               *args], capture_output=True, text=True, timeout=60, env=env)

    def close(self) -> None:
        for ch in self.channels:
            ch.close()


def denied(call: Callable[[], Any]) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
    return str(err.value.details())


def test_roles_gate_every_call_and_the_audit_trail_says_who(tmp_path: Path) -> None:
    pki = make_certs(tmp_path / "pki", NAMES)
    roles = ["--role", "coord=coordinator", "--role", "h*=agent", "--role", "ops=operator",
             "--role", "alice=reader"]
    cluster = Cluster(tmp_path / "cluster", 2, coordinator_args=[*tls_flags(pki, "coord"),
                                                                 *roles])
    people = {n: As(pki, n) for n in ("ops", "alice", "mallory", "h2")}
    host = Host(tmp_path / "h1", {"vm1": ["d0"]}, agent_id="h1")
    try:
        host.agent.extra = ["--coordinator", cluster.addresses, *tls_flags(pki, "h1"),
                            "--role", "coord=coordinator"]
        host.agent.start()
        leader, follower = (c.address for c in cluster.coordinators)
        ops = people["ops"].coordinator(leader)
        via = people["ops"].coordinator(follower)
        for stub in (ops, via):  # both replicas serving
            stub.ListAgents(cpb.ListAgentsRequest(), timeout=30, wait_for_ready=True)
        wait_until(lambda: any(a.live for a in ops.ListAgents(
            cpb.ListAgentsRequest(), timeout=10).agents), timeout=60, what="h1 registered")

        # an operator backs up, through the follower (forwarded to the leader)
        txn = via.StartTransaction(cpb.StartTransactionRequest(
            targets=[cpb.Target(target="h1/vm1")], request_id="ops-1"), timeout=30)
        wait_until(lambda: ops.GetTransaction(cpb.GetTransactionRequest(
            txn_id=txn.txn_id), timeout=10).phase == cpb.TXN_PHASE_DONE, timeout=60,
            what="the backup to finish")

        # a reader reads, but cannot back up, cancel or prune; an unmapped identity
        # cannot even read; nothing changes
        alice = people["alice"].coordinator(follower)
        before = alice.ListTransactions(cpb.ListTransactionsRequest(), timeout=10)
        why = denied(lambda: alice.StartTransaction(cpb.StartTransactionRequest(
            targets=[cpb.Target(target="h1/vm1")]), timeout=10))
        assert why == ("alice (role reader) may not call StartTransaction: it needs "
                       "coordinator or operator")
        denied(lambda: alice.PruneSets(cpb.PruneSetsRequest(dry_run=True), timeout=10))
        mallory = people["mallory"].coordinator(leader)
        why = denied(lambda: mallory.ListAgents(cpb.ListAgentsRequest(), timeout=10))
        assert why.startswith("mallory (role none) may not call ListAgents")
        assert alice.ListTransactions(cpb.ListTransactionsRequest(), timeout=10) == before

        # an agent registers only as itself
        h2 = people["h2"].coordinator(leader)
        address = {a.agent_id: a.address for a in ops.ListAgents(
            cpb.ListAgentsRequest(), timeout=10).agents}["h1"]
        why = denied(lambda: h2.RegisterAgent(cpb.RegisterAgentRequest(
            agent_id="h1", address="127.0.0.1:1", inventory=apb.Inventory(agent_id="h1")),
            timeout=10))
        assert why == "h2: may register only as agent 'h2', not 'h1'"
        assert {a.agent_id: a.address for a in ops.ListAgents(
            cpb.ListAgentsRequest(), timeout=10).agents}["h1"] == address

        # only coordinators call agents
        denied(lambda: people["ops"].agent(host.agent.address).GetInventory(
            apb.GetInventoryRequest(), timeout=10))

        # the audit trail: each mutating call once, with the caller's identity
        listed = people["alice"].cli(leader, "audit", "--since", "1h", "--json")
        assert listed.returncode == 0, listed.stderr
        trail = [(e["identity"], e["method"], e["code"]) for e in json.loads(listed.stdout)]
        assert trail == [("ops", "StartTransaction", "OK"),
                         ("alice", "StartTransaction", "PERMISSION_DENIED"),
                         ("alice", "PruneSets", "PERMISSION_DENIED")]
        first = json.loads(listed.stdout)[0]
        assert first["role"] == "operator" and '"requestId": "ops-1"' in first["request"]
        text = people["ops"].cli(follower, "audit")
        assert text.returncode == 0 and "ops" in text.stdout and "OK" in text.stdout
    finally:
        for p in people.values():
            p.close()
        host.close()
        cluster.close()


def test_roles_need_mutual_tls() -> None:
    done = subprocess.run([sys.executable, "-m", "blocktxn.coordinator", "--role",
                           "ops=operator"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout.strip() == ("blocktxn coordinator: --role needs mutual TLS (--tls-ca, "
                                   "--tls-cert, --tls-key): identities come from client "
                                   "certificates")
    done = subprocess.run([sys.executable, "-m", "blocktxn.coordinator", "--role",
                           "ops=admin"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "ROLE one of reader, operator, agent" in done.stdout
