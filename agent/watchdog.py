"""The freeze watchdog: a separate process that thaws a guest at its freeze deadline.

The agent starts one per guest it freezes (``python -m agent.watchdog``) and kills it
once it has thawed the guest itself. If the agent is stopped, hung or killed, the
watchdog still thaws at the deadline — the bounded-freeze invariant must not depend
on the agent being scheduled.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

from agent.errors import AgentError
from agent.guest_agent import GuestAgentClient


async def watch(ga_socket: str, deadline: float) -> None:
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
    p = argparse.ArgumentParser(prog="python -m agent.watchdog")
    p.add_argument("--ga", required=True)
    p.add_argument("--deadline", type=float, required=True, help="unix time")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s watchdog %(message)s")
    asyncio.run(watch(args.ga, args.deadline))


if __name__ == "__main__":
    main()
