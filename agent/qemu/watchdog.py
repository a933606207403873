"""The freeze watchdog: a separate process that ends a guest's quiesce at its deadline.

The agent keeps one per guest it quiesces (``python -m blocktxn.agent.qemu.watchdog``),
started before the first freeze and then kept for the next ones, so that neither its
start-up nor a process per transaction costs anything in a cut. With ``--ga SOCKET``
it thaws a filesystem freeze through the guest agent; with ``--qmp SOCKET`` (a monitor
of the VM kept for the watchdog alone: QEMU serves one client per monitor, and the
agent holds its own) it resumes a paused VM with ``cont``, over a connection it opens
at its start. It writes ``ready`` on stdout once it can act; the agent quiesces only
after reading that.

Its input is one command per line: ``arm DEADLINE`` (unix time) just before a quiesce
— from then on it ends the quiesce at the deadline by itself — and ``disarm`` once the
agent has ended the quiesce itself (a thaw that failed leaves it armed). End of input
means the agent is gone: an armed watchdog still ends the quiesce at its deadline, then
exits; an unarmed one exits at once. If the agent is stopped, hung or killed after the
quiesce, the watchdog still ends it at the deadline — the bounded-freeze invariant must
not depend on the agent being scheduled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from ..errors import AgentError
from .guest_agent import GuestAgentClient

READY = "ready"
TRIES = 3


def arm_line(deadline: float) -> bytes:
    return f"arm {deadline!r}\n".encode()


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


async def serve(what: str, end: End) -> None:
    """Say ready, then follow the agent's commands until the end of its input."""
    loop = asyncio.get_running_loop()
    sys.stdout.write(READY + "\n")
    sys.stdout.flush()
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
    if armed is not None:  # the agent is gone: the armed deadline still holds
        with contextlib.suppress(asyncio.CancelledError):
            await armed


async def watch_guest_agent(ga_socket: str) -> None:
    await serve(ga_socket, GuestAgentClient(ga_socket, timeout=5.0).thaw)


async def watch_pause(qmp_socket: str) -> None:
    """Resume over a connection opened now. It lives as long as the watchdog: the agent
    retires its watchdogs whenever its own connection to the VM is lost or made again
    (a restarted QEMU), so the next freeze gets a watchdog with a fresh connection."""
    qmp = QMPClient("blocktxn-watchdog")
    qmp.events.event_filter = lambda event: False  # keeps no event: it lives long
    await asyncio.wait_for(qmp.connect(qmp_socket), 5.0)
    try:
        await serve(qmp_socket, lambda: asyncio.wait_for(qmp.execute("cont"), 5.0))
    finally:
        await qmp.disconnect()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m blocktxn.agent.qemu.watchdog")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--ga", help="guest agent socket: thaw the filesystems")
    how.add_argument("--qmp", help="the watchdog's own QMP monitor: resume a paused VM")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s watchdog %(message)s")
    asyncio.run(watch_guest_agent(args.ga) if args.ga else watch_pause(args.qmp))


if __name__ == "__main__":
    main()
