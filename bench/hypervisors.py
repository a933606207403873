"""Section ``libvirt``: the same backup transaction through the agent on each backend.

One incremental with zero dirty data (after a base) of one VM's disks through the agent
alone (Cut, Thaw, Prepare, Commit), median over reps, taken rep by rep in turn on:
- ``bare_qemu``: a bare-QEMU VM (qemu-storage-daemon, the lab's usual VM): the floor;
- ``libvirt``: a libvirt domain with the same number of qcow2 disks (TCG, no OS);
- ``floor_libvirt``: what libvirt itself takes for the same work, by a direct script on a
  second domain: ``backupBegin`` (push, incremental, new checkpoint, pre-created targets)
  until the job completed, then the old checkpoint deleted.

``libvirt`` against ``bare_qemu`` is what choosing the libvirt backend costs a
transaction; against ``floor_libvirt``, what the agent adds on top of libvirt.
libvirtd is started for the run if none runs (and stopped after, if so).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import libvirt

from blocktxn.v1 import agent_pb2 as apb
from tests.integration.harness import Host
from tests.integration.libvirt_lab import LibvirtDaemons, LibvirtHost, LibvirtLabVm

from .latency import AgentCase
from .report import Row, median, ratio


class LibvirtFloor:
    """libvirt's own incremental push backup of a domain's disks, checkpoint to checkpoint."""

    def __init__(self, vm: LibvirtLabVm, work: Path) -> None:
        self.vm, self.work = vm, work
        self.disks = [d.name for d in vm.disks]
        self.count = 0
        self.previous = ""
        work.mkdir(parents=True, exist_ok=True)
        self._backup(full=True)

    def _targets(self, name: str) -> dict[str, Path]:
        out = {}
        for d in self.disks:
            path = self.work / f"{name}-{d}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "32M"],
                           check=True)
            out[d] = path
        return out

    def _backup(self, full: bool = False) -> float:
        self.count += 1
        name = f"floor{self.count}"
        targets = self._targets(name)  # like the agent's stage: before the clock starts
        mode = "backupmode='full'" if full else (
            f"backupmode='incremental' incremental='{self.previous}'")
        disks = "".join(f"<disk name='{d}' backup='yes' type='file' {mode}><target file="
                        f"'{targets[d]}'/><driver type='qcow2'/></disk>" for d in self.disks)
        checkpoint = "".join(f"<disk name='{d}' checkpoint='bitmap'/>" for d in self.disks)
        dom: Any = self.vm.dom
        t0 = time.perf_counter()
        dom.backupBegin(f"<domainbackup mode='push'><disks>{disks}</disks></domainbackup>",
                        f"<domaincheckpoint><name>{name}</name><disks>{checkpoint}</disks>"
                        "</domaincheckpoint>", libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
        while dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
            time.sleep(0.001)
        if self.previous:
            dom.checkpointLookupByName(self.previous).delete(0)
        elapsed = (time.perf_counter() - t0) * 1000
        self.previous = name
        for path in targets.values():
            path.unlink()
        return elapsed

    def __call__(self) -> float:
        return self._backup()


def run(work: Path, quick: bool) -> list[Row]:
    disk_counts = (2,) if quick else (2, 8)
    reps = 3 if quick else 10
    daemons = LibvirtDaemons()
    daemons.start()
    rows: list[Row] = []
    try:
        for n in disk_counts:
            rows += _case(work / f"d{n}", n, reps)
    finally:
        daemons.stop()
    return rows


def _case(work: Path, n: int, reps: int) -> list[Row]:
    qemu_disks = [f"d{i}" for i in range(n)]
    lv_disks = [f"vd{chr(97 + i)}" for i in range(n)]
    bare = Host(work / "bare", {"vm1": qemu_disks}, agent_id="bare")
    lv = LibvirtHost(work / "lv", {"vm1": lv_disks}, agent_id="lv")
    floor_vm = LibvirtLabVm.create_domain("floor", work / "floor", lv_disks)
    try:
        floor_vm.start()
        bare.start_agent()
        lv.start_agent()
        cases = {"bare_qemu": AgentCase(bare, "vm1", qemu_disks),
                 "libvirt": AgentCase(lv, "vm1", lv_disks)}
        for host, disks in ((bare, qemu_disks), (lv, lv_disks)):  # the base: a full
            if not host.backup("base", [("vm1", d) for d in disks],
                               quiesce=apb.QUIESCE_NONE).yes:
                raise RuntimeError(f"{host.agent.agent_id}: the base backup voted NO")
        floor = LibvirtFloor(floor_vm, work / "floor-targets")
        samples: dict[str, list[float]] = {"bare_qemu": [], "libvirt": [], "floor_libvirt": []}
        for i in range(1 + reps):  # one warm-up rep, then in turn
            got = {"floor_libvirt": floor(), **{k: c() for k, c in cases.items()}}
            if i:
                for k, v in got.items():
                    samples[k].append(v)
    finally:
        bare.close()
        lv.close()
        floor_vm.remove()
    case = f"disks={n} agent"
    b, lvm, f = (median(samples[k]) for k in ("bare_qemu", "libvirt", "floor_libvirt"))
    return [Row("libvirt", case, "bare_qemu", b, "ms"),
            Row("libvirt", case, "floor_libvirt", f, "ms"),
            Row("libvirt", case, "libvirt", lvm, "ms", "bare_qemu", ratio(lvm, b)),
            Row("libvirt", case, "libvirt", lvm, "ms", "floor_libvirt", ratio(lvm, f))]
