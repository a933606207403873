"""One lab host for agent tests: VMs, workloads, stand-in guest agents, an agent."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from blocktxn.demo.guest import StandInGuestAgent, Workload, close_guests
from blocktxn.demo.lab import AgentProcess, LabVm, qmp_call
from blocktxn.v1 import agent_pb2 as pb
from blocktxn.v1 import agent_pb2_grpc as pb_grpc

RPC_TIMEOUT = 60.0


class Host:
    """VMs of one host, each with a workload and a guest agent, served by one agent."""

    def __init__(self, workdir: Path, vms: dict[str, list[str]], *,
                 read_error: tuple[str, ...] = (), agent_id: str = "host1",
                 system: bool = False, disk_size: int = 32 << 20) -> None:
        self.workdir = workdir
        self.vms: dict[str, LabVm] = {}
        self.workloads: dict[str, Workload] = {}
        self.gas: dict[str, StandInGuestAgent] = {}
        for name, disks in vms.items():
            vm = LabVm.create(name, workdir / name, disks, size=disk_size,
                              read_error_disks=tuple(d for d in disks if d in read_error),
                              system=system)
            vm.start()
            self.vms[name] = vm
            wl = Workload(vm)
            wl.attach()
            self.workloads[name] = wl
            self.gas[name] = StandInGuestAgent(workdir / name / "ga.sock", wl)
        self.agent = AgentProcess(agent_id, workdir / "agent", list(self.vms.values()),
                                  {n: g.path for n, g in self.gas.items()})
        self.channel: grpc.Channel | None = None
        self.stub: pb_grpc.AgentServiceStub

    # ------------------------------------------------------------------ agent
    def start_agent(self) -> None:
        self.agent.start()
        self.channel = grpc.insecure_channel(self.agent.address)
        self.stub = pb_grpc.AgentServiceStub(self.channel)
        self.stub.GetInventory(pb.GetInventoryRequest(), timeout=30, wait_for_ready=True)

    def kill_agent(self) -> None:
        self.agent.kill()
        if self.channel:
            self.channel.close()

    def restart_agent(self) -> None:
        self.kill_agent()
        self.start_agent()

    def close(self) -> None:
        self.agent.stop()
        if self.channel:
            self.channel.close()
        close_guests(self.gas.values(), self.workloads.values(), self.vms.values())

    # -------------------------------------------------------------- protocol
    def cut(self, txn: str, members: list[tuple[str, str]],
            mode: pb.BackupMode.ValueType = pb.BACKUP_MODE_AUTO,
            quiesce: pb.Quiesce.ValueType = pb.QUIESCE_FREEZE, freeze_timeout: float = 10.0,
            speed: int = 0) -> pb.CutResponse:
        req = pb.CutRequest(
            txn_id=txn, quiesce=quiesce, freeze_timeout_s=freeze_timeout,
            members=[pb.CutMember(vm=v, disk=d, mode=mode, speed=speed) for v, d in members])
        resp: pb.CutResponse = self.stub.Cut(req, timeout=RPC_TIMEOUT)
        return resp

    def thaw(self, txn: str) -> pb.ThawResponse:
        resp: pb.ThawResponse = self.stub.Thaw(pb.ThawRequest(txn_id=txn), timeout=RPC_TIMEOUT)
        return resp

    def prepare(self, txn: str) -> pb.PrepareResponse:
        resp: pb.PrepareResponse = self.stub.Prepare(
            pb.PrepareRequest(txn_id=txn, timeout_s=RPC_TIMEOUT), timeout=RPC_TIMEOUT)
        return resp

    def commit(self, txn: str) -> pb.CommitResponse:
        resp: pb.CommitResponse = self.stub.Commit(pb.CommitRequest(txn_id=txn),
                                                   timeout=RPC_TIMEOUT)
        return resp

    def abort(self, txn: str) -> None:
        self.stub.Abort(pb.AbortRequest(txn_id=txn, reason="test"), timeout=RPC_TIMEOUT)

    def backup(self, txn: str, members: list[tuple[str, str]], commit: bool = True,
               **kw: Any) -> pb.PrepareResponse:
        """Cut, thaw, prepare and (if YES and *commit*) commit."""
        self.cut(txn, members, **kw)
        self.thaw(txn)
        vote = self.prepare(txn)
        if vote.yes and commit:
            self.commit(txn)
        return vote

    def wait_pending(self, txn: str) -> list[pb.DiskProgress]:
        """Follow the Status stream until no job is running."""
        last: list[pb.DiskProgress] = []
        for update in self.stub.Status(pb.StatusRequest(txn_id=txn, interval_s=0.05),
                                       timeout=RPC_TIMEOUT):
            last = list(update.disks)
        return last

    def inventory(self) -> pb.Inventory:
        inv: pb.Inventory = self.stub.GetInventory(pb.GetInventoryRequest(), timeout=RPC_TIMEOUT)
        return inv

    # ------------------------------------------------------------ QEMU truth
    def qmp(self, vm: str, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Ask QEMU directly (a second QMP client, not the agent)."""
        return qmp_call(self.vms[vm].probe_socket, cmd, args)

    def bitmaps(self, vm: str, disk: str) -> dict[str, dict[str, Any]]:
        nodes = self.qmp(vm, "query-named-block-nodes", {"flat": True})
        for n in nodes:
            if n["node-name"] == disk:
                return {b["name"]: b for b in n.get("dirty-bitmaps", []) if "name" in b}
        raise KeyError(disk)

    def jobs(self, vm: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.qmp(vm, "query-jobs")
        return result

    def image(self, rel: str) -> Path:
        return self.agent.repo / rel


def wait_until(pred: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def restore(host: Host, set_id: str, vm: str, disk: str, name: str, fmt: str = "raw") -> Path:
    resp = host.stub.Restore(pb.RestoreRequest(
        set_id=set_id, vm=vm, disk=disk, destination=str(host.agent.restore_dir / name),
        format=fmt), timeout=RPC_TIMEOUT)
    return Path(resp.path)


def iter_files(root: Path) -> Iterator[Path]:
    return (p for p in root.rglob("*") if p.is_file())
