"""The freeze watchdog: a separate process that ends a guest's quiesce at its deadline.

The agent keeps one per guest it quiesces (``python -m blocktxn.agent.qemu.watchdog``),
started before the first freeze and then kept for the next ones, so that neither its
start-up nor a process per transaction costs anything in a cut. With ``--ga SOCKET``
it thaws a filesystem freeze through the guest agent; with ``--qmp SOCKET`` (a monitor
of the VM kept for the watchdog alone: QEMU serves one client per monitor, and the
agent holds its own) it resumes a paused VM with ``cont``, over a connection it opens
at its start. Its protocol with the agent (``ready``; ``arm DEADLINE``, answered
``armed DEADLINE`` or ``busy WHY``; ``disarm``, answered ``disarmed`` or ``ending``; end
of input) is in ``agent/watchdog.py``;
the agent quiesces only after the ``armed`` answer, and a thaw that failed leaves it
armed. ``--vm-key`` names the VM (the agent gives its QMP socket): one armed watchdog
per VM at a time, so that one outliving its agent cannot end a later freeze. If the
agent is stopped, hung or killed after the quiesce, the watchdog still ends it at the
deadline — the bounded-freeze invariant must not depend on the agent being scheduled.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from qemu.qmp import QMPClient

from ..watchdog import END_TIMEOUT, serve
from .guest_agent import GuestAgentClient


async def watch_guest_agent(ga_socket: str, vm_key: str) -> None:
    await serve(ga_socket, GuestAgentClient(ga_socket, timeout=END_TIMEOUT).thaw, vm_key)


async def watch_pause(qmp_socket: str, vm_key: str) -> None:
    """Resume over a connection opened now. It lives as long as the watchdog: the agent
    retires its watchdogs whenever its own connection to the VM is lost or made again
    (a restarted QEMU), so the next freeze gets a watchdog with a fresh connection."""
    qmp = QMPClient("blocktxn-watchdog")
    qmp.events.event_filter = lambda event: False  # keeps no event: it lives long
    await asyncio.wait_for(qmp.connect(qmp_socket), 5.0)
    try:
        await serve(qmp_socket, lambda: asyncio.wait_for(qmp.execute("cont"), END_TIMEOUT),
                    vm_key)
    finally:
        await qmp.disconnect()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m blocktxn.agent.qemu.watchdog")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--ga", help="guest agent socket: thaw the filesystems")
    how.add_argument("--qmp", help="the watchdog's own QMP monitor: resume a paused VM")
    p.add_argument("--vm-key", help="names the VM: one armed watchdog per key at a time "
                   "(default: the socket given)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s watchdog %(message)s")
    key = args.vm_key or args.ga or args.qmp
    asyncio.run(watch_guest_agent(args.ga, key) if args.ga else watch_pause(args.qmp, key))


if __name__ == "__main__":
    main()
