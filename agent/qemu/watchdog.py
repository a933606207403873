"""The freeze watchdog: a separate process that thaws a guest at its freeze deadline.

The agent starts one per guest it is about to freeze (``python -m blocktxn.agent.qemu.watchdog``),
early, so that its start-up costs nothing inside the freeze; just before the freeze
it writes the deadline (unix time) as one line on the watchdog's stdin, and it kills
the watchdog once it has thawed the guest itself. End of input before a deadline
means no freeze happened: the watchdog exits. If the agent is stopped, hung or
killed after the freeze, the watchdog still thaws at the deadline — the
bounded-freeze invariant must not depend on the agent being scheduled.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from ..errors import AgentError
from .guest_agent import GuestAgentClient


async def watch(ga_socket: str, deadline: float) -> None:
    """Sleep until *deadline*, then thaw (retried a few times)."""
    await asyncio.sleep(max(0.0, deadline - time.time()))
    client = GuestAgentClient(ga_socket, timeout=5.0)
    for _ in range(3):
        try:
            await client.thaw()
            logging.warning("freeze deadline passed: watchdog thawed %s", ga_socket)
            return
        except AgentError as err:
            logging.warning("watchdog thaw of %s failed: %s", ga_socket, err)
            await asyncio.sleep(0.5)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m blocktxn.agent.qemu.watchdog")
    p.add_argument("--ga", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s watchdog %(message)s")
    line = sys.stdin.readline()
    if not line.strip():
        return  # the agent went away before freezing: nothing to thaw
    asyncio.run(watch(args.ga, float(line)))


if __name__ == "__main__":
    main()
