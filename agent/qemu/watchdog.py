"""The freeze watchdog: a separate process that ends a guest's quiesce at its deadline.

The agent starts one per guest it is about to quiesce (``python -m
blocktxn.agent.qemu.watchdog``), early, so that its start-up costs nothing inside the
freeze window. With ``--ga SOCKET`` it thaws a filesystem freeze through the guest
agent; with ``--qmp SOCKET`` (a monitor of the VM kept for the watchdog alone: QEMU
serves one client per monitor, and the agent holds its own) it resumes a paused VM
with ``cont``, over a connection it opens before the freeze. It writes ``ready`` on
stdout once it can act; the agent quiesces only after reading that. Then the agent
writes the deadline (unix time) as one line on stdin, and kills the watchdog once it
has ended the quiesce itself. End of input before a deadline means no quiesce
happened: the watchdog exits. If the agent is stopped, hung or killed after the
quiesce, the watchdog still ends it at the deadline — the bounded-freeze invariant
must not depend on the agent being scheduled.
"""

from __future__ import annotations

import argparse
import asyncio
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


async def _end_at(deadline: float, what: str, end: Callable[[], Awaitable[object]]) -> None:
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


async def _deadline() -> float | None:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return float(line) if line.strip() else None


def _ready() -> None:
    sys.stdout.write(READY + "\n")
    sys.stdout.flush()


async def watch_guest_agent(ga_socket: str) -> None:
    _ready()
    deadline = await _deadline()
    if deadline is not None:
        client = GuestAgentClient(ga_socket, timeout=5.0)
        await _end_at(deadline, ga_socket, client.thaw)


async def watch_pause(qmp_socket: str) -> None:
    qmp = QMPClient("blocktxn-watchdog")
    await asyncio.wait_for(qmp.connect(qmp_socket), 5.0)
    try:
        _ready()
        deadline = await _deadline()
        if deadline is not None:
            await _end_at(deadline, qmp_socket,
                          lambda: asyncio.wait_for(qmp.execute("cont"), 5.0))
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
