"""The one main loop of both daemons: parse the configuration once, run until
SIGINT/SIGTERM, stop in order. Exit code 2 and one line for a bad configuration."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from blocktxn.errors import BlocktxnError

C = TypeVar("C")

#: Stop hooks, run in order after the signal.
Stops = list[Callable[[], Awaitable[None]]]


def on_signal() -> asyncio.Event:
    """An event set by the first SIGINT or SIGTERM from now on (installed before the
    daemon starts: a stop asked for while it starts is a clean stop once the start is
    over, not a death by the signal's default action)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


#: Seconds the stop hooks may take before the process exits anyway (as on SIGKILL,
#: which every daemon survives: what it must keep is on disk before it answers).
STOP_LIMIT = 30.0


def _exit_after(seconds: float, name: str) -> None:
    """A safety net no coroutine can block: a stop that hangs (a task that lost its
    cancellation) must not keep a stopped daemon running."""
    def hard_exit() -> None:
        logging.getLogger(name).error("stopping took over %gs: exiting now", seconds)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(seconds, hard_exit)
    timer.daemon = True
    timer.start()


def main(name: str, argv: Sequence[str], parser: argparse.ArgumentParser,
         configure: Callable[[argparse.Namespace], C],
         start: Callable[[C], Awaitable[Stops]]) -> int:
    """Run daemon *name*: *configure* parses the options (ValueError: exit 2),
    *start* brings the daemon up and returns its stop hooks (a blocktxn error while
    starting, e.g. a corrupt journal: one line, exit 1)."""
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s {name} %(levelname)s %(message)s")
    args = parser.parse_args(list(argv))
    try:
        config = configure(args)
    except ValueError as err:
        print(f"blocktxn {name}: {err}")
        return 2

    async def run() -> None:
        signalled = on_signal()
        stops = await start(config)
        try:
            await signalled.wait()
        finally:
            _exit_after(STOP_LIMIT, name)
            for stop in stops:
                await stop()

    try:
        asyncio.run(run())
    except BlocktxnError as err:
        logging.getLogger(name).error("cannot start: %s", err)
        print(f"blocktxn {name}: cannot start: {err}")
        return 1
    return 0
