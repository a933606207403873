"""A cluster for coordinator tests: real etcd, coordinator replicas, lab hosts."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from blocktxn import procs
from blocktxn.coordinator.etcd_server import EtcdServer
from blocktxn.coordinator.store import leader_name
from blocktxn.demo.lab import free_port
from blocktxn.v1 import coordinator_pb2 as cpb
from blocktxn.v1 import coordinator_pb2_grpc as cpb_grpc
from tests.integration.harness import Host


class CoordinatorProcess:
    def __init__(self, name: str, workdir: Path, etcd: str,
                 env: dict[str, str] | None = None, extra: list[str] | None = None) -> None:
        self.name, self.workdir, self.etcd, self.env = name, workdir, etcd, env or {}
        self.extra = extra or []
        self.prefix: list[str] = []  # e.g. procs.DIE_WITH_PARENT
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "blocktxn.coordinator", "--name", self.name,
             "--listen", self.address, "--etcd", self.etcd, "--data-dir", str(self.workdir),
             *self.extra],
            stdout=subprocess.DEVNULL, stderr=open(self.workdir / f"{self.name}.log", "ab"),
            env={**os.environ, **self.env})

    def kill(self) -> None:
        procs.kill(self.proc)

    def stop(self) -> None:
        procs.terminate(self.proc)


class Cluster:
    """etcd + N coordinator replicas + lab hosts registered with them."""

    def __init__(self, workdir: Path, replicas: int = 1,
                 first_env: dict[str, str] | None = None, extra: list[str] | None = None,
                 coordinator_args: list[str] | None = None, env: dict[str, str] | None = None
                 ) -> None:
        """Replica c0 starts first and is the first leader; it alone gets *first_env*;
        every replica gets *coordinator_args* and *env*."""
        self.workdir = workdir
        self.etcd = EtcdServer(workdir / "etcd")
        self.etcd.start()
        self.coordinators = [CoordinatorProcess(f"c{i}", workdir / f"c{i}", self.etcd.endpoint,
                                                {**(env or {}), **(first_env or {})} if i == 0
                                                else env, [*(extra or []),
                                                           *(coordinator_args or [])])
                             for i in range(replicas)]
        for i, c in enumerate(self.coordinators):
            c.start()
            if i == 0 and replicas > 1:
                deadline = time.monotonic() + 20
                while self.leader() != 0:
                    if time.monotonic() > deadline:
                        raise TimeoutError("c0 did not become leader")
                    time.sleep(0.1)
        self.hosts: dict[str, Host] = {}
        self.extra = extra or []  # daemon flags shared by coordinators and agents
        self._channels: dict[str, grpc.Channel] = {}

    @property
    def addresses(self) -> str:
        return ",".join(c.address for c in self.coordinators)

    def stub(self, replica: int = 0) -> cpb_grpc.CoordinatorServiceStub:
        address = self.coordinators[replica].address
        if address not in self._channels:
            self._channels[address] = grpc.insecure_channel(address)
        return cpb_grpc.CoordinatorServiceStub(self._channels[address])

    def any_stub(self) -> cpb_grpc.CoordinatorServiceStub:
        """A stub of a replica that is still running."""
        for i, c in enumerate(self.coordinators):
            if c.proc and c.proc.poll() is None:
                return self.stub(i)
        raise RuntimeError("no coordinator running")

    def add_host(self, agent_id: str, vms: dict[str, list[str]],
                 agent_args: list[str] | None = None, **kw: Any) -> Host:
        host = Host(self.workdir / agent_id, vms, agent_id=agent_id, **kw)
        host.agent.extra = ["--coordinator", self.addresses, *self.extra, *(agent_args or [])]
        host.start_agent()
        self.hosts[agent_id] = host
        return host

    def wait_registered(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                agents = self.any_stub().ListAgents(cpb.ListAgentsRequest(), timeout=5).agents
                if sum(1 for a in agents if a.live and a.inventory.vms) >= n:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError("agents did not register")

    def start(self, targets: list[str], **kw: Any) -> cpb.Transaction:
        # a retry after a lost reply must be the same request: one request id for all
        kw.setdefault("request_id", f"test-{os.urandom(8).hex()}")
        req = cpb.StartTransactionRequest(targets=[cpb.Target(target=t) for t in targets], **kw)
        deadline = time.monotonic() + 30
        while True:  # a fresh cluster may not have elected its leader yet
            try:
                txn: cpb.Transaction = self.any_stub().StartTransaction(req, timeout=30)
                return txn
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def wait_done(self, txn_id: str, timeout: float = 120) -> cpb.Transaction:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                txn: cpb.Transaction = self.any_stub().GetTransaction(
                    cpb.GetTransactionRequest(txn_id=txn_id), timeout=10)
                if txn.phase == cpb.TXN_PHASE_DONE:
                    return txn
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{txn_id} not done")

    def leader(self) -> int | None:
        """Index of the replica holding the etcd leader key, if any."""
        name = asyncio.run(leader_name(self.etcd.endpoint))
        return next((i for i, c in enumerate(self.coordinators) if c.name == name), None)

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        for host in self.hosts.values():
            host.close()
        for c in self.coordinators:
            c.stop()
        self.etcd.stop()
