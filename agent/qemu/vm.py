"""The QEMU backend: one VM reached through its QMP socket, quiesced through its
qemu-ga socket, with a watchdog process that thaws the guest at its deadline."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..aio import gather_all
from ..backend import Disk, JobProgress, VmBackend
from ..errors import QemuError
from ..participant_messages import MemberPlan
from . import blockjobs, watchdog
from .guest_agent import GuestAgentClient
from .qmp import VmConnection

WATCHDOG_START = 10.0  # seconds a watchdog may take to say it is ready


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
        self.watchdog: asyncio.subprocess.Process | None = None
        self._ready: asyncio.subprocess.Process | None = None  # the watchdog said ready
        self._watching = ""  # the watchdog's kind: --ga (freeze) or --qmp (pause)
        self._armed = False  # told a deadline, not yet disarmed
        self._stale = False  # retire it once disarmed (its own connection may be dead)
        self._reaping: set[asyncio.Task[int]] = set()

    async def _lost(self, _: VmConnection) -> None:
        self._renew_watchdog()
        if self.on_lost:
            await self.on_lost(self)

    async def _connected(self, _: VmConnection) -> None:
        self._renew_watchdog()
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
        self._stop_watchdog()
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
        """Have a watchdog (see watchdog.py) for this kind of quiesce: the one kept
        from an earlier freeze, or a new one started now, so that its start-up costs
        nothing inside the freeze; it is armed with the deadline just before it."""
        flag = "--ga" if quiesce == "freeze" else "--qmp"
        proc = self.watchdog
        if proc is not None and proc.returncode is None and self._watching == flag:
            return
        self._stop_watchdog()
        sock = self.ga_socket if quiesce == "freeze" else self.watch_socket
        assert sock is not None
        self.watchdog = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "blocktxn.agent.qemu.watchdog", flag, sock,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            start_new_session=True)
        self._watching = flag

    async def freeze_abandon(self) -> None:
        """Nothing to undo: the watchdog stays, unarmed, for the next freeze."""

    async def freeze(self, quiesce: str, deadline: float) -> None:
        if quiesce == "freeze":
            assert self.guest_agent is not None
            await self._arm_watchdog(deadline)
            await self.guest_agent.freeze()
        elif quiesce == "pause":
            await self._arm_watchdog(deadline)
            await blockjobs.pause(self.conn)

    async def thaw(self, quiesce: str) -> None:
        """Thaw; only a thaw that worked disarms the watchdog (a failed one leaves the
        guest to the watchdog's thaw at the deadline)."""
        if quiesce == "freeze":
            assert self.guest_agent is not None
            await self.guest_agent.thaw()
        elif quiesce == "pause":
            await blockjobs.resume(self.conn)
        if await self._tell_watchdog(watchdog.DISARM):
            self._armed = False
        if self._stale and not self._armed:
            self._stop_watchdog()

    async def freeze_ready(self) -> None:
        """Wait (outside the freeze window) until the watchdog says it can act.

        Raises:
            QemuError: it did not start, so the guest must not be frozen.
        """
        proc = self.watchdog
        if proc is None or proc.stdout is None or proc is self._ready:
            return
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), WATCHDOG_START)
        except TimeoutError:
            line = b""
        if line.decode().strip() != watchdog.READY:
            raise QemuError(f"VM {self.name}: freeze watchdog did not start "
                            f"(see the agent's log); not freezing")
        self._ready = proc

    async def _arm_watchdog(self, deadline: float) -> None:
        """Give the watchdog its deadline: from now on it will thaw by itself.

        Raises:
            QemuError: no watchdog is running, so the guest must not be frozen.
        """
        proc = self.watchdog
        if (proc is None or proc.stdin is None or proc.stdout is None
                or proc.returncode is not None):
            raise QemuError(f"VM {self.name}: freeze watchdog is not running; not freezing")
        await self.freeze_ready()
        if not await self._tell_watchdog(watchdog.arm_line(deadline)):
            raise QemuError(f"VM {self.name}: freeze watchdog is gone; not freezing")
        self._armed = True

    def _renew_watchdog(self) -> None:
        """The VM connection was lost or made again (QEMU may have restarted, and a pause
        watchdog's own monitor connection with it): the next freeze gets a new watchdog.
        An armed one is left armed until the agent's thaw disarms it."""
        if self._armed:
            self._stale = True
        else:
            self._stop_watchdog()

    async def _tell_watchdog(self, line: bytes) -> bool:
        """Write one command to the watchdog; False if it is gone."""
        proc = self.watchdog
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            return False
        try:
            proc.stdin.write(line)
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def _stop_watchdog(self) -> None:
        """Retire the watchdog: the end of its input makes an unarmed one exit, and an
        armed one (a thaw failed) still ends that quiesce at its deadline first."""
        proc, self.watchdog = self.watchdog, None
        self._armed = self._stale = False
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
            task = asyncio.ensure_future(proc.wait())
            self._reaping.add(task)
            task.add_done_callback(self._reaping.discard)

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
