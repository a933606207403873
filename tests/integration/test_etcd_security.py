"""The coordinator on an etcd that requires TLS with client certificates and user
authentication: a backup commits through it; a wrong password or a missing CA gets no
leadership and writes nothing."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from aetcd import rpc as etcd_rpc
from aetcd.utils import prefix_range_end
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blocktxn import procs
from blocktxn.coordinator.store import PREFIX
from blocktxn.demo.lab import free_port
from blocktxn.v1 import coordinator_pb2 as cpb
from blocktxn.v1 import coordinator_pb2_grpc as cpb_grpc
from tests.integration.cluster import CoordinatorProcess
from tests.integration.harness import Host, wait_until
from tests.integration.pki import make_certs

READWRITE = 2


class SecureEtcd:
    """etcd with TLS, --client-cert-auth, and auth enabled: user blocktxn may read and
    write /blocktxn/ only."""

    def __init__(self, workdir: Path) -> None:
        self.pki = make_certs(workdir / "pki", ("server", "root", "blocktxn"))
        self.port, peer = free_port(), free_port()
        client, peer_url = f"https://127.0.0.1:{self.port}", f"http://127.0.0.1:{peer}"
        binary = shutil.which("etcd")
        assert binary is not None
        self.proc = subprocess.Popen(
            [binary, "--name", "s", "--data-dir", str(workdir / "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"s={peer_url}",
             "--cert-file", str(self.pki / "server.crt"),
             "--key-file", str(self.pki / "server.key"),
             "--trusted-ca-file", str(self.pki / "ca.crt"), "--client-cert-auth",
             "--logger", "zap", "--log-outputs", str(workdir / "etcd.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.channel = grpc.secure_channel(f"127.0.0.1:{self.port}", self.creds("root"))
        grpc.channel_ready_future(self.channel).result(timeout=30)
        auth = etcd_rpc.AuthStub(self.channel)
        auth.UserAdd(etcd_rpc.AuthUserAddRequest(name="root", password="rootpw"), timeout=10)
        auth.UserGrantRole(etcd_rpc.AuthUserGrantRoleRequest(user="root", role="root"),
                           timeout=10)
        auth.RoleAdd(etcd_rpc.AuthRoleAddRequest(name="blocktxn"), timeout=10)
        prefix = PREFIX.encode()
        auth.RoleGrantPermission(etcd_rpc.AuthRoleGrantPermissionRequest(
            name="blocktxn", perm=etcd_rpc.Permission(
                permType=READWRITE, key=prefix, range_end=prefix_range_end(prefix))),
            timeout=10)
        auth.UserAdd(etcd_rpc.AuthUserAddRequest(name="blocktxn", password="s3cret"),
                     timeout=10)
        auth.UserGrantRole(etcd_rpc.AuthUserGrantRoleRequest(user="blocktxn", role="blocktxn"),
                           timeout=10)
        auth.AuthEnable(etcd_rpc.AuthEnableRequest(), timeout=10)
        token = auth.Authenticate(etcd_rpc.AuthenticateRequest(name="root", password="rootpw"),
                                  timeout=10).token
        self.metadata = (("token", token),)

    def creds(self, name: str) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials((self.pki / "ca.crt").read_bytes(),
                                            (self.pki / f"{name}.key").read_bytes(),
                                            (self.pki / f"{name}.crt").read_bytes())

    def keys(self) -> list[bytes]:
        """Every key under blocktxn's prefix (read as root)."""
        prefix = PREFIX.encode()
        reply = etcd_rpc.KVStub(self.channel).Range(etcd_rpc.RangeRequest(
            key=prefix, range_end=prefix_range_end(prefix), keys_only=True),
            timeout=10, metadata=self.metadata)
        return [kv.key for kv in reply.kvs]

    def close(self) -> None:
        self.channel.close()
        procs.terminate(self.proc)


@pytest.fixture
def secure_etcd(tmp_path: Path) -> Iterator[SecureEtcd]:
    etcd = SecureEtcd(tmp_path / "etcd")
    yield etcd
    etcd.close()


def flags(etcd: SecureEtcd, password: str) -> list[str]:
    secret = etcd.pki / f"password-{password}"
    secret.write_text(password + "\n")
    return ["--etcd-ca", str(etcd.pki / "ca.crt"), "--etcd-cert",
            str(etcd.pki / "blocktxn.crt"), "--etcd-key", str(etcd.pki / "blocktxn.key"),
            "--etcd-user", "blocktxn", "--etcd-password-file", str(secret)]


def test_a_backup_commits_through_an_etcd_with_tls_and_auth(
    tmp_path: Path, secure_etcd: SecureEtcd,
) -> None:
    endpoint = f"127.0.0.1:{secure_etcd.port}"
    coordinator = CoordinatorProcess("c0", tmp_path / "c0", endpoint,
                                     extra=flags(secure_etcd, "s3cret"))
    host = Host(tmp_path / "h1", {"vm1": ["d0"]}, agent_id="h1")
    coordinator.start()
    try:
        host.agent.extra = ["--coordinator", coordinator.address]
        host.start_agent()
        with grpc.insecure_channel(coordinator.address) as ch:
            stub = cpb_grpc.CoordinatorServiceStub(ch)

            def start() -> cpb.Transaction | None:
                try:
                    txn: cpb.Transaction = stub.StartTransaction(cpb.StartTransactionRequest(
                        targets=[cpb.Target(target="h1/vm1")]), timeout=10)
                    return txn
                except grpc.RpcError:
                    return None

            wait_until(lambda: start() is not None, timeout=60,
                       what="a leader that can start a transaction")
            txns = stub.ListTransactions(cpb.ListTransactionsRequest(), timeout=10)
            txn_id = txns.transactions[0].txn_id

            def done() -> bool:
                got = stub.GetTransaction(cpb.GetTransactionRequest(txn_id=txn_id), timeout=10)
                return got.phase == cpb.TXN_PHASE_DONE

            wait_until(done, timeout=60, what="the transaction to finish")
            got = stub.GetTransaction(cpb.GetTransactionRequest(txn_id=txn_id), timeout=10)
            assert got.decision == cpb.DECISION_COMMIT, got.reason
        keys = secure_etcd.keys()
        assert f"{PREFIX}txn/{txn_id}".encode() in keys
        assert f"{PREFIX}set/{txn_id}".encode() in keys
        assert f"{PREFIX}leader".encode() in keys
    finally:
        host.close()
        coordinator.stop()


@pytest.mark.parametrize("how", ["wrong password", "no CA"])
def test_without_the_right_credentials_nothing_is_written(
    tmp_path: Path, secure_etcd: SecureEtcd, how: str,
) -> None:
    endpoint = f"127.0.0.1:{secure_etcd.port}"
    extra = flags(secure_etcd, "wrong") if how == "wrong password" else []
    coordinator = CoordinatorProcess("c0", tmp_path / "c0", endpoint, extra=extra)
    coordinator.start()
    try:
        time.sleep(8)  # longer than a campaign takes on a reachable etcd
        assert coordinator.proc is not None and coordinator.proc.poll() is None
        assert secure_etcd.keys() == []
        log = (tmp_path / "c0" / "c0.log").read_text()
        if how == "wrong password":  # said in the log and by health, with the reason
            assert "authentication failed" in log
            with grpc.insecure_channel(coordinator.address) as ch:
                reply, call = health_pb2_grpc.HealthStub(ch).Check.with_call(
                    health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            reason = dict(call.trailing_metadata() or ())["blocktxn-reason"]
            assert "authentication failed" in reason
        else:
            assert "UNAVAILABLE" in log
    finally:
        coordinator.stop()
    # and it stops cleanly (an etcd that refuses is no reason to fail at exit)
    assert coordinator.proc.returncode == 0
    assert "cannot start" not in (tmp_path / "c0" / "c0.log").read_text()
