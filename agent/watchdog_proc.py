"""The agent's side of a freeze watchdog process (one per quiesced VM, any backend).

A backend's watchdog is a separate process (``python -m MODULE ARGS...``) that ends a
quiesce at its deadline even if the agent dies; it speaks the line protocol of
``watchdog.py`` (``ready`` on stdout; ``arm DEADLINE`` and ``disarm``
on stdin, each answered on stdout; end of input: an unarmed one exits, an armed
one ends the quiesce at its deadline first). This class starts, arms, disarms and
retires one, and keeps it from one freeze to the next as long as it watches the same
way. One that does not answer its ``arm`` in time is killed (the next freeze gets a
new one) and the guest is not frozen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import watchdog
from .errors import FreezeRefusedError, QemuError

WATCHDOG_START = 10.0  # seconds a watchdog may take to say it is ready
#: Seconds a watchdog may take to acknowledge ``arm`` (inside the cut, before the
#: freeze) or ``disarm`` (a healthy one answers in well under a millisecond; see
#: test_watchdog_ack).
ARM_ACK_TIMEOUT = 2.0


def alive(proc: asyncio.subprocess.Process) -> bool:
    """The watchdog process still runs. Its returncode alone lags: asyncio sets it on the
    loop some time after the child died, and a watchdog killed just before a freeze was
    taken for alive (its arm line went nowhere, and the guest froze with no watchdog).
    A dead child is a zombie in /proc, or gone once the child watcher reaped it."""
    if proc.returncode is not None:
        return False
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


class WatchdogHandle:
    """One VM's freeze watchdog process, as the agent holds it."""

    def __init__(self, vm: str) -> None:
        self.vm = vm
        self.proc: asyncio.subprocess.Process | None = None
        self._ready: asyncio.subprocess.Process | None = None  # the watchdog said ready
        self._argv: tuple[str, ...] = ()  # what the running one was started with
        self.armed = False  # told a deadline, not yet disarmed
        self._stale = False  # retire it once disarmed (its own connection may be dead)
        # one command and its answer at a time: a disarm (the agent stopping) that
        # comes while an arm waits for its answer is sent after that answer
        self._talking = asyncio.Lock()
        self._reaping: set[asyncio.Task[int]] = set()

    async def prepare(self, module: str, args: Sequence[str], claim_key: str) -> None:
        """Have a watchdog ``python -m module args``: the one kept from an earlier
        freeze if it watches the same way, or a new one started now (its start-up then
        costs nothing inside the freeze).

        Raises:
            FreezeRefusedError: a watchdog process holds the VM's claim (*claim_key*, as
                the watchdog is given it) now, so its ``arm`` would be refused "busy":
                refused here, before the cut's targets are made, not after.
        """
        if watchdog.held_elsewhere(claim_key):
            raise FreezeRefusedError(f"VM {self.vm}: not freezing: {watchdog.HELD_ELSEWHERE}")
        argv = (module, *args)
        proc = self.proc
        if proc is not None and alive(proc) and self._argv == argv:
            return
        self.stop()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", *argv,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            start_new_session=True)
        self._argv = argv

    async def ready(self) -> None:
        """Wait (outside the freeze window) until the watchdog says it can act.

        Raises:
            QemuError: it did not start, so the guest must not be frozen.
        """
        proc = self.proc
        if proc is None or proc.stdout is None or proc is self._ready:
            return
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), WATCHDOG_START)
        except TimeoutError:
            line = b""
        if line.decode().strip() != watchdog.READY:
            raise QemuError(f"VM {self.vm}: freeze watchdog did not start "
                            f"(see the agent's log); not freezing")
        self._ready = proc

    async def arm(self, deadline: float) -> None:
        """Give the watchdog its deadline and wait for its answer: from then on it
        will thaw by itself.

        Raises:
            FreezeRefusedError: no watchdog is running, it is busy with an earlier
                quiesce, or it did not acknowledge the deadline (it is then killed: the
                next freeze gets a new one), so the guest must not be frozen.
        """
        proc = self.proc
        if proc is None or proc.stdin is None or proc.stdout is None or not alive(proc):
            raise FreezeRefusedError(f"VM {self.vm}: freeze watchdog is not running; "
                                     "not freezing")
        await self.ready()
        async with self._talking:
            await self._arm(proc, deadline)

    async def _arm(self, proc: asyncio.subprocess.Process, deadline: float) -> None:
        assert proc.stdout is not None
        answered = False  # the watchdog works (armed, or refused with a reason)
        try:
            if not await self._tell(watchdog.arm_line(deadline)):
                raise FreezeRefusedError(f"VM {self.vm}: freeze watchdog is gone; "
                                         "not freezing")
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), ARM_ACK_TIMEOUT)
            except TimeoutError:
                line = b""
            answer = line.decode(errors="replace").strip()
            word, _, why = answer.partition(" ")
            if word == watchdog.BUSY:  # it works, and it stays (it may owe a thaw)
                answered = True
                raise FreezeRefusedError(f"VM {self.vm}: not freezing: {why}")
            if answer != watchdog.armed_line(deadline):
                raise FreezeRefusedError(
                    f"VM {self.vm}: freeze watchdog did not acknowledge its deadline "
                    f"within {ARM_ACK_TIMEOUT:g}s ({answer or 'no answer'}); it is "
                    f"replaced; not freezing")
            answered = True
        finally:
            if not answered:  # in any state, cancelled included: never freeze under it
                self.kill(proc)
        self.armed = True

    async def disarm(self) -> None:
        """The agent ended the quiesce itself (only a thaw that worked calls this).
        Once it returns, the watchdog has answered: ``disarmed`` (it let go of the VM's
        claim, so the next freeze, even by another watchdog process, is not refused by
        this one) or ``ending`` (the deadline had passed: it keeps the claim until its
        own thaw attempts are over). A watchdog that does not answer in time, or is
        gone, is retired (its input closed, not killed: it may owe a thaw)."""
        async with self._talking:
            await self._disarm()

    async def _disarm(self) -> None:
        proc = self.proc
        if not self.armed or proc is None or proc.stdout is None:
            return  # nothing of ours to disarm (its arm failed, or it was replaced)
        if not await self._tell(watchdog.DISARM):
            return
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), ARM_ACK_TIMEOUT)
        except TimeoutError:
            line = b""
        answer = line.decode(errors="replace").strip()
        self.armed = False
        if answer not in (watchdog.DISARMED, watchdog.ENDING):
            logging.warning("VM %s: freeze watchdog did not answer its disarm within %gs "
                            "(%s); retiring it", self.vm, ARM_ACK_TIMEOUT,
                            answer or "no answer")
            self._stale = True
        if self._stale:
            self.stop()

    def renew(self) -> None:
        """The VM connection was lost or made again: the next freeze gets a new
        watchdog. An armed one is left armed until the agent's thaw disarms it."""
        if self.armed:
            self._stale = True
        else:
            self.stop()

    async def _tell(self, line: bytes) -> bool:
        """Write one command to the watchdog; False if it is gone."""
        proc = self.proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            return False
        try:
            proc.stdin.write(line)
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def kill(self, proc: asyncio.subprocess.Process) -> None:
        """Kill *proc*, a watchdog that failed us (our child, not yet reaped: its pid is
        still its own), and forget it if it is the current one; the next ``prepare``
        starts a new one."""
        if proc is self.proc:
            self.proc = None
            self.armed = self._stale = False
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            self._reap(proc)

    def stop(self) -> None:
        """Retire the watchdog: the end of its input makes an unarmed one exit, and an
        armed one (a thaw failed) still ends that quiesce at its deadline first."""
        proc, self.proc = self.proc, None
        self.armed = self._stale = False
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
            self._reap(proc)

    def _reap(self, proc: asyncio.subprocess.Process) -> None:
        """Wait for *proc*'s exit in the background (no zombie left)."""
        task = asyncio.ensure_future(proc.wait())
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)
