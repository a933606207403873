"""A freeze watchdog killed just before a freeze is seen dead at once, although asyncio
has not noticed yet (its returncode is still None: the child watcher's thread may have
reaped it, but the returncode is set on the loop): the agent then starts a new one
instead of arming a dead one (found by test_one_watchdog_serves_every_freeze... under
load)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from blocktxn.agent.watchdog_proc import alive


def wait_dead(pid: int) -> None:
    """Block until *pid* is a zombie or gone (asyncio's child watcher thread may reap it;
    the returncode still waits for the loop, which this blocks)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_killed_child_not_yet_reaped_is_not_alive() -> None:
    async def run() -> tuple[bool, bool | None, bool]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import time; time.sleep(60)")
        before = alive(proc)
        os.kill(proc.pid, signal.SIGKILL)
        wait_dead(proc.pid)
        unreaped = proc.returncode is None
        after = alive(proc)
        await proc.wait()
        return before, unreaped, after

    before, unreaped, after = asyncio.run(run())
    assert before and unreaped and not after
