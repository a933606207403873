"""Mutual TLS on every hop: CLI -> coordinator -> agents, agents -> coordinator."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import agent_pb2_grpc
from tests.integration.cluster import Cluster
from tests.integration.harness import Host
from tests.integration.pki import make_certs


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, a certificate for the daemons (127.0.0.1) and one for the operator."""
    make_certs(d, ("node", "operator"))
    return {"ca": d / "ca.crt", "node_crt": d / "node.crt", "node_key": d / "node.key",
            "op_crt": d / "operator.crt", "op_key": d / "operator.key"}


def test_mutual_tls_end_to_end(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    flags = ["--tls-cert", str(pki["node_crt"]), "--tls-key", str(pki["node_key"]),
             "--tls-ca", str(pki["ca"])]
    cluster = Cluster(tmp_path / "cluster", 1, extra=flags)
    try:
        # (the harness's own Host.start_agent talks plaintext: start it by hand)
        h = Host(tmp_path / "h1", {"vm1": ["d0"]}, agent_id="h1")
        h.agent.extra = ["--coordinator", cluster.addresses, *flags]
        h.agent.start()
        cluster.hosts["h1"] = h
        creds = grpc.ssl_channel_credentials(pki["ca"].read_bytes(), pki["op_key"].read_bytes(),
                                              pki["op_crt"].read_bytes())
        with grpc.secure_channel(h.agent.address, creds) as ch:
            inv = agent_pb2_grpc.AgentServiceStub(ch).GetInventory(
                apb.GetInventoryRequest(), timeout=30, wait_for_ready=True)
            assert inv.agent_id == "h1"
        with grpc.insecure_channel(h.agent.address) as ch:  # plaintext is refused
            with pytest.raises(grpc.RpcError):
                agent_pb2_grpc.AgentServiceStub(ch).GetInventory(apb.GetInventoryRequest(),
                                                                 timeout=3)

        def cli(*args: str, tls: bool = True) -> subprocess.CompletedProcess[str]:
            base = [sys.executable, "-m", "blocktxn", "--coordinator",
                    cluster.coordinators[0].address]
            if tls:
                base += ["--tls-cert", str(pki["op_crt"]), "--tls-key", str(pki["op_key"]),
                         "--tls-ca", str(pki["ca"])]
            return subprocess.run([*base, *args], capture_output=True, text=True, timeout=120)

        for _ in range(100):  # registration over mTLS
            agents = cli("agents", "--json")
            if agents.returncode == 0 and any(a.get("live") for a in json.loads(agents.stdout)):
                break
            time.sleep(0.2)
        done = cli("backup", "h1/vm1", "--wait", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["state"] == "committed"
        refused = cli("agents", tls=False)        # no client certificate: no service
        assert refused.returncode == 3
        bad = cli("--tls-ca", str(tmp_path / "missing.crt"), "agents", tls=False)
        assert bad.returncode == 2 and "does not exist" in bad.stderr
    finally:
        cluster.close()
