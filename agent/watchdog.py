"""The freeze watchdog's side of its protocol with the agent, for every backend.

A watchdog is a separate process per quiesced VM that ends the quiesce at its
deadline even if the agent dies (``blocktxn.agent.qemu.watchdog`` for bare QEMU,
``blocktxn.agent.libvirt.watchdog`` for libvirt). It writes ``ready`` on stdout once
it can act; its input is one command per line: ``arm DEADLINE`` (unix time) just
before a quiesce and ``disarm`` once the agent has ended the quiesce itself. Every
``arm`` is answered on stdout, ``armed DEADLINE`` once the timer is set: the agent
quiesces only after that answer (a wedged watchdog, or one whose pipe is open but
that reads nothing, is noticed before the freeze, not at the deadline). End of
input means the agent is gone: an armed watchdog still ends the quiesce at its
deadline, then exits; an unarmed one exits at once. (The agent's side is
``watchdog_proc.py``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable

from qemu.qmp.error import QMPError

from .errors import AgentError

READY = "ready"
TRIES = 3


def arm_line(deadline: float) -> bytes:
    return f"arm {deadline!r}\n".encode()


def armed_line(deadline: float) -> str:
    """The watchdog's answer to ``arm_line(deadline)`` once it is armed."""
    return f"armed {deadline!r}"


DISARM = b"disarm\n"

End = Callable[[], Awaitable[object]]


async def _end_at(deadline: float, what: str, end: End) -> None:
    """Sleep until *deadline*, then *end* the quiesce (retried a few times)."""
    await asyncio.sleep(max(0.0, deadline - time.time()))
    for _ in range(TRIES):
        try:
            await end()
            logging.warning("freeze deadline passed: watchdog ended the quiesce of %s", what)
            return
        except (AgentError, QMPError, OSError, TimeoutError) as err:
            logging.warning("watchdog: ending the quiesce of %s failed: %s", what, err)
            await asyncio.sleep(0.5)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def serve(what: str, end: End) -> None:
    """Say ready, then follow the agent's commands until the end of its input."""
    loop = asyncio.get_running_loop()
    _say(READY)
    armed: asyncio.Task[None] | None = None
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        word, _, arg = line.strip().partition(" ")
        try:
            deadline = float(arg) if word == "arm" else None
        except ValueError:
            word = "?"
        if word not in ("arm", "disarm"):  # never disarms by mistake
            logging.error("watchdog: unknown command %r ignored", line.strip())
            continue
        if armed is not None:
            armed.cancel()
            armed = None
        if deadline is not None:
            armed = asyncio.create_task(_end_at(deadline, what, end))
            _say(armed_line(deadline))
    if armed is not None:  # the agent is gone: the armed deadline still holds
        with contextlib.suppress(asyncio.CancelledError):
            await armed
