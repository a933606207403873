"""The chaos cluster inside the lab namespaces: 3 etcd members, 2 coordinator
replicas, 3 agent hosts with 2 VMs each; every process started, killed,
stopped and restarted by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from blocktxn import procs
from blocktxn.demo.guest import StandInGuestAgent, Workload, close_guests
from blocktxn.demo.lab import AgentProcess, LabVm
from tests.chaos.netlab import NetLab

ETCD = ("e1", "e2", "e3")
COORDS = ("c1", "c2")
HOSTS = ("h1", "h2", "h3")
VMS = ("web", "db")
DISKS = ("d0", "d1")
FAULTY_DISK = "d1"  # on every VM: blkdebug underneath, for injected read errors
DISK_SIZE = 8 << 20
REPO_SIZE = 512 << 20  # tmpfs per agent repository (made full by the repo_full fault)
CLIENT = "cl"


@dataclass
class Proc:
    """A lab daemon: how to start it again, and its current process."""

    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    stopped: bool = False

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"))
        self.stopped = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, sig)
            self.stopped = sig == signal.SIGSTOP

    def kill(self) -> None:
        procs.kill(self.proc)
        self.stopped = False

    def terminate(self) -> None:
        procs.terminate(self.proc)


@dataclass
class Host:
    name: str
    vms: dict[str, LabVm] = field(default_factory=dict)
    workloads: dict[str, Workload] = field(default_factory=dict)
    gas: dict[str, StandInGuestAgent] = field(default_factory=dict)
    agent: AgentProcess | None = None
    repo: Path = Path()


class ChaosCluster:
    def __init__(self, net: NetLab, workdir: Path) -> None:
        self.net = net
        self.workdir = workdir
        self.etcd: dict[str, Proc] = {}
        self.coords: dict[str, Proc] = {}
        self.hosts: dict[str, Host] = {}

    @property
    def etcd_endpoints(self) -> str:
        return ",".join(f"{self.net.addr(e)}:2379" for e in ETCD)

    @property
    def coordinator_addresses(self) -> list[str]:
        return [f"{self.net.addr(c)}:7400" for c in COORDS]

    def start(self) -> None:
        peers = ",".join(f"{e}=http://{self.net.addr(e)}:2380" for e in ETCD)
        for e in ETCD:
            ip = self.net.addr(e)
            d = self.workdir / e
            d.mkdir(parents=True, exist_ok=True)
            p = Proc(e, [*self.net.exec_prefix(e), "etcd", "--name", e, "--data-dir",
                         str(d / "data"), "--listen-client-urls", f"http://{ip}:2379",
                         "--advertise-client-urls", f"http://{ip}:2379",
                         "--listen-peer-urls", f"http://{ip}:2380",
                         "--initial-advertise-peer-urls", f"http://{ip}:2380",
                         "--initial-cluster", peers, "--initial-cluster-state", "new",
                         "--heartbeat-interval", "100", "--election-timeout", "1000"],
                     d / "etcd.log")
            p.start()
            self.etcd[e] = p
        for c in COORDS:
            ip = self.net.addr(c)
            d = self.workdir / c
            d.mkdir(parents=True, exist_ok=True)
            p = Proc(c, [*self.net.exec_prefix(c), sys.executable, "-m", "blocktxn.coordinator",
                         "--name", c, "--listen", f"{ip}:7400", "--etcd", self.etcd_endpoints,
                         "--data-dir", str(d)], d / "coordinator.log")
            p.start()
            self.coords[c] = p
        for h in HOSTS:
            host = Host(h, repo=self.workdir / h / "agent" / "repo")
            for v in VMS:
                vm = LabVm.create(v, self.workdir / h / v, list(DISKS), size=DISK_SIZE,
                                  read_error_disks=(FAULTY_DISK,))
                vm.prefix = self.net.exec_prefix(h)
                vm.start()
                wl = Workload(vm)
                wl.attach()
                for d_ in DISKS:
                    wl.write(d_, 0)  # cluster 0: where read errors are armed
                host.vms[v], host.workloads[v] = vm, wl
                host.gas[v] = StandInGuestAgent(self.workdir / h / v / "ga.sock", wl)
            host.agent = AgentProcess(
                h, self.workdir / h / "agent", list(host.vms.values()),
                {v: g.path for v, g in host.gas.items()},
                extra=["--coordinator", ",".join(self.coordinator_addresses)],
                host_ip=self.net.addr(h), prefix=self.net.exec_prefix(h))
            host.agent.start()
            self.hosts[h] = host

    def restart_vm(self, host: str, vm: str) -> None:
        """After a QEMU kill: resync the shadows from the crashed images, restart."""
        h = self.hosts[host]
        lab_vm, wl = h.vms[vm], h.workloads[vm]
        with wl.lock:
            wl.detach()
            for d in lab_vm.disks:
                subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw",
                                str(d.image), str(wl.shadows[d.name])], check=True)
            lab_vm.start()
            wl.attach()

    def stop_all(self) -> None:
        for h in self.hosts.values():
            if h.agent is not None:
                h.agent.stop()
            close_guests(h.gas.values(), h.workloads.values(), h.vms.values())
        for p in [*self.coords.values(), *self.etcd.values()]:
            p.terminate()

    def wait_ready(self, timeout: float = 60) -> None:
        from blocktxn.client import SyncClient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for address in self.coordinator_addresses:
                try:
                    agents = SyncClient(address, timeout=3).agents()
                    if sum(1 for a in agents if a.live and a.inventory.vms) == len(HOSTS):
                        return
                except Exception:  # not up yet
                    pass
            time.sleep(0.5)
        raise TimeoutError("chaos cluster did not come up")
