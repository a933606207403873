"""Read-only views of one agent: its inventory (VMs, disks, checkpoints) and the
progress of a transaction's jobs. Nothing here changes state."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from .backend import JobProgress, VmBackend
from .errors import AgentError
from .participant import ParticipantMachine, TxnState
from .participant_messages import Phase
from .planner import checkpoint_state
from .repository import Repository


@dataclass(frozen=True)
class DiskView:
    name: str
    size: int
    format: str
    checkpoint: str
    usable: bool
    problem: str
    busy_txn: str


@dataclass(frozen=True)
class VmView:
    name: str
    connected: bool
    disks: tuple[DiskView, ...]
    jobs: tuple[str, ...]
    frozen: bool
    has_guest_agent: bool


@dataclass(frozen=True)
class DiskStatus:
    vm: str
    disk: str
    status: str
    done: int
    total: int
    error: str


async def inventory(backends: Mapping[str, VmBackend], machine: ParticipantMachine,
                    repo: Repository, frozen: Mapping[str, str]) -> list[VmView]:
    """Every VM with its disks and whether each can be backed up incrementally."""
    busy = machine.busy_disks()
    out = []
    for name, vm in backends.items():
        disks: list[DiskView] = []
        if vm.connected:
            with contextlib.suppress(AgentError):
                for disk in (await vm.disks()).values():
                    last = repo.last_image(name, disk.name)
                    state = checkpoint_state(
                        disk, last, last is not None and repo.path(last.image).exists())
                    disks.append(DiskView(disk.name, disk.size, disk.format, state.checkpoint,
                                          state.usable, state.problem,
                                          busy.get((name, disk.name), "")))
        out.append(VmView(name, vm.connected, tuple(disks), tuple(sorted(vm.job_ids())),
                          name in frozen, vm.can_freeze))
    return out


async def progress(backends: Mapping[str, VmBackend], st: TxnState, interval: float
                   ) -> AsyncIterator[tuple[TxnState, list[DiskStatus]]]:
    """Snapshots of *st*'s jobs every *interval* s until none is running any more."""
    while True:
        jobs: dict[str, Mapping[str, JobProgress]] = {}
        for name in {m.vm for m in st.members}:
            vm = backends[name]
            with contextlib.suppress(AgentError):
                jobs[name] = await vm.progress() if vm.connected else {}
        disks = []
        for m in st.members:
            job = jobs.get(m.vm, {}).get(m.job_id)
            if job is not None:
                done, total = job.done, job.total
                if not total:  # a job adopted after a restart: the cut said how much
                    total = st.bytes_total.get(m.key, 0)
                    done = total if job.status == "pending" else 0
                disks.append(DiskStatus(m.vm, m.disk, job.status, done, total, job.error))
                continue
            image = next((i for i in st.images if (i.vm, i.disk) == m.key), None)
            if image is not None:
                disks.append(DiskStatus(m.vm, m.disk, "done", image.bytes, image.bytes, ""))
            else:
                disks.append(DiskStatus(m.vm, m.disk, "gone", 0,
                                        st.bytes_total.get(m.key, 0), ""))
        yield st, disks
        running = st.phase in (Phase.CUTTING, Phase.FROZEN, Phase.RUNNING) and any(
            d.status not in ("pending", "concluded", "done", "gone") for d in disks)
        if not running:
            return
        await asyncio.sleep(interval)
