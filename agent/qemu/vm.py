"""The QEMU backend: one VM reached through its QMP socket, quiesced through its
qemu-ga socket, with a watchdog process that thaws the guest at its deadline."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..aio import gather_all
from ..backend import Disk, JobProgress, VmBackend
from ..participant_messages import MemberPlan
from ..watchdog_proc import WatchdogHandle
from . import blockjobs
from .guest_agent import GuestAgentClient
from .qmp import VmConnection

WATCHDOG_MODULE = "blocktxn.agent.qemu.watchdog"


class QemuVm(VmBackend):
    """A qemu-system-* or qemu-storage-daemon process (``--vm NAME=QMP[,ga=GA]``)."""

    def __init__(self, name: str, qmp_socket: str, ga_socket: str | None,
                 qmp_timeout: float, watch_socket: str | None = None) -> None:
        super().__init__(name)
        self.conn = VmConnection(name, qmp_socket, timeout=qmp_timeout)
        self.conn.on_lost = self._lost
        self.conn.on_connected = self._connected
        self.ga_socket = ga_socket
        self.watch_socket = watch_socket  # a monitor for the watchdog alone (pause)
        self.guest_agent = GuestAgentClient(ga_socket) if ga_socket else None
        self.watchdog = WatchdogHandle(name)
        # names the VM for its watchdogs: one armed at a time, whatever it watches and
        # whichever agent process started it (see agent/watchdog.py)
        self.vm_key = os.path.realpath(qmp_socket)

    async def _lost(self, _: VmConnection) -> None:
        self.watchdog.renew()
        if self.on_lost:
            await self.on_lost(self)

    async def _connected(self, _: VmConnection) -> None:
        self.watchdog.renew()
        if self.on_connected:
            await self.on_connected(self)

    # ------------------------------------------------------------ lifecycle
    @property
    def connected(self) -> bool:
        return self.conn.connected

    def start(self) -> None:
        self.conn.start()

    async def stop(self) -> None:
        """Disconnect. An armed watchdog is left running: it still owes a guest whose
        thaw failed its thaw at the deadline (it exits by itself after)."""
        self.watchdog.stop()
        await self.conn.stop()

    async def wait_connected(self, timeout: float) -> bool:
        return await self.conn.wait_connected(timeout)

    # ------------------------------------------------------------ inventory
    async def disks(self) -> dict[str, Disk]:
        return await self.conn.disks()

    def job_ids(self) -> set[str]:
        return set(self.conn.jobs)

    async def progress(self) -> Mapping[str, JobProgress]:
        return dict(await self.conn.refresh_jobs())

    @property
    def can_freeze(self) -> bool:
        return self.guest_agent is not None

    async def pause_problem(self) -> str:
        if not await blockjobs.can_pause(self.conn):
            return "QEMU has no QMP stop (qemu-storage-daemon?)"
        if not self.watch_socket:
            return ("no monitor for the freeze watchdog (add a second QMP monitor to the "
                    "VM and name it with watch=PATH in --vm)")
        return ""

    # -------------------------------------------------------------- quiesce
    async def freeze_prepare(self, quiesce: str) -> None:
        """Have a watchdog (see watchdog.py) for this kind of quiesce, armed with the
        deadline just before the freeze."""
        if quiesce == "freeze":
            assert self.ga_socket is not None
            args = ["--ga", self.ga_socket]
        else:
            assert self.watch_socket is not None
            args = ["--qmp", self.watch_socket]
        await self.watchdog.prepare(WATCHDOG_MODULE, [*args, "--vm-key", self.vm_key],
                                    self.vm_key)

    async def freeze_abandon(self) -> None:
        """Nothing to undo: the watchdog stays, unarmed, for the next freeze."""

    async def freeze(self, quiesce: str, deadline: float) -> None:
        if quiesce == "freeze":
            assert self.guest_agent is not None
            await self.watchdog.arm(deadline)
            await self.guest_agent.freeze()
        elif quiesce == "pause":
            await self.watchdog.arm(deadline)
            await blockjobs.pause(self.conn)

    async def thaw(self, quiesce: str) -> None:
        """Thaw; only a thaw that worked disarms the watchdog (a failed one leaves the
        guest to the watchdog's thaw at the deadline)."""
        if quiesce == "freeze":
            assert self.guest_agent is not None
            await self.guest_agent.thaw()
        elif quiesce == "pause":
            await blockjobs.resume(self.conn)
        await self.watchdog.disarm()

    async def freeze_ready(self) -> None:
        """Wait (outside the freeze window) until the watchdog says it can act.

        Raises:
            QemuError: it did not start, so the guest must not be frozen.
        """
        await self.watchdog.ready()

    # ------------------------------------------------------------- the jobs
    async def attach_targets(self, members: Sequence[MemberPlan],
                             path_of: Callable[[str], Path]) -> None:
        await blockjobs.attach_targets(self.conn, members, path_of)

    async def start_jobs(self, members: Sequence[MemberPlan]) -> None:
        await blockjobs.start_jobs(self.conn, members)

    async def wait_copied(self, members: Sequence[MemberPlan], timeout: float | None) -> None:
        await blockjobs.wait_pending(self.conn, members, timeout)

    async def close_targets(self, members: Sequence[MemberPlan]) -> dict[tuple[str, str], int]:
        copied = await gather_all(*(blockjobs.finish(self.conn, m) for m in members))
        return {m.key: n for m, n in zip(members, copied, strict=True)}

    async def drop_checkpoints(self, checkpoints: Sequence[tuple[str, str]]) -> None:
        await blockjobs.remove_bitmaps(self.conn, checkpoints)

    async def rollback_jobs(self, members: Sequence[MemberPlan]) -> None:
        await blockjobs.cancel_jobs(self.conn, members)

    async def sweep(self, keep_jobs: set[str], keep_nodes: set[str],
                    keep_checkpoints: dict[str, set[str]]) -> list[str]:
        return await blockjobs.sweep(self.conn, keep_jobs, keep_nodes, keep_checkpoints)
