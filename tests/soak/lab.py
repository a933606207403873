"""The soak's lab: small qemu-storage-daemon VMs whose every disk sits on a blkdebug
node that can fail a read many times over (``ARMS`` one-shot read errors per disk, each
armed by ``Workload.arm_read_error``), and hosts built from them.

``LabVm``'s own blkdebug node arms one read error per VM process; a soak of thousands
of transactions needs more, so ``SoakVm.start`` chains ``ARMS`` of them: arm k moves
the node from state 2k+1 to 2k+2 (a sub-4k write), the next data read there fails once
(EIO) and moves it on to 2k+3, where the next arm waits.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from blocktxn.demo.guest import StandInGuestAgent, Workload
from blocktxn.demo.lab import AgentProcess, LabDisk, LabVm, wait_for_path
from tests.integration.harness import Host

ARMS = 64  # read errors each disk can be made to fail with, one after the other


def blkdebug_chain(disk: LabDisk, arms: int = ARMS) -> dict[str, Any]:
    """A blkdebug node under *disk* with *arms* one-shot read errors, armed in turn."""
    set_state: list[dict[str, Any]] = []
    inject: list[dict[str, Any]] = []
    for k in range(arms):
        armed = 2 * k + 2
        set_state += [{"event": "pwritev_rmw_tail", "state": armed - 1, "new_state": armed},
                      {"event": "read_aio", "state": armed, "new_state": armed + 1}]
        inject.append({"event": "read_aio", "state": armed, "errno": 5, "iotype": "read",
                       "once": True, "immediately": False})
    return {"driver": "blkdebug", "node-name": f"{disk.name}-dbg", "align": 4096,
            "image": {"driver": "file", "filename": str(disk.image)},
            "set-state": set_state, "inject-error": inject}


class SoakVm(LabVm):
    """A qemu-storage-daemon like ``LabVm`` (same sockets, exports and node names),
    with a chain of read errors under every disk."""

    def start(self) -> None:
        for sock in (self.qmp_socket, self.probe_socket, self.nbd_socket):
            sock.unlink(missing_ok=True)
        argv = ["qemu-storage-daemon"]
        for d in self.disks:
            argv += ["--blockdev", json.dumps(blkdebug_chain(d)),
                     "--blockdev", f"driver=qcow2,node-name={d.name},file={d.name}-dbg"]
        argv += ["--nbd-server", f"addr.type=unix,addr.path={self.nbd_socket}"]
        for d in self.disks:
            argv += ["--export",
                     f"type=nbd,id=exp-{d.name},node-name={d.name},name={d.name},writable=on"]
        for i, sock in enumerate((self.qmp_socket, self.probe_socket)):
            argv += ["--chardev", f"socket,path={sock},server=on,wait=off,id=qmp{i}",
                     "--monitor", f"chardev=qmp{i}"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / "qsd.log", "ab"))
        for sock in (self.qmp_socket, self.probe_socket, self.nbd_socket):
            wait_for_path(sock)


class SoakHost(Host):
    """A lab host (``tests.integration.harness.Host``) of SoakVms with disks of
    *disk_size* bytes; its agent reads runtime failpoints from ``failpoint_file``."""

    def __init__(self, workdir: Path, vms: dict[str, list[str]], *, agent_id: str,
                 disk_size: int) -> None:
        self.workdir = workdir
        self.vms: dict[str, LabVm] = {}
        self.workloads: dict[str, Workload] = {}
        self.gas: dict[str, StandInGuestAgent] = {}
        self.failpoint_file = workdir / "failpoints"
        for name, disks in vms.items():
            vm = SoakVm.create(name, workdir / name, disks, size=disk_size,
                               read_error_disks=tuple(disks))
            vm.start()
            self.vms[name] = vm
            wl = Workload(vm)
            wl.attach()
            self.workloads[name] = wl
            self.gas[name] = StandInGuestAgent(workdir / name / "ga.sock", wl)
        self.agent = AgentProcess(agent_id, workdir / "agent", list(self.vms.values()),
                                  {n: g.path for n, g in self.gas.items()},
                                  env={"BLOCKTXN_FAILPOINT_FILE": str(self.failpoint_file)})
        self.channel = None
