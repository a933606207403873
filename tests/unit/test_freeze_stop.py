"""A stopping agent waits for a freeze in flight before it thaws: thawed (and its
watchdog disarmed) while the freeze was still being set up, the guest would freeze
right after, with nothing left to end it. Found by a review: a SIGTERM during a cut's
watchdog arm. No new freeze starts once the agent is stopping."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from blocktxn.agent.errors import FreezeRefusedError
from blocktxn.agent.freeze import FreezeControl


class SlowGuest:
    """A backend whose freeze takes until the test lets it end."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.go_on = asyncio.Event()

    async def freeze(self, quiesce: str, deadline: float) -> None:
        self.calls.append("freeze begins")
        await self.go_on.wait()
        self.calls.append("frozen")

    async def thaw(self, quiesce: str) -> None:
        self.calls.append("thawed")


def test_stop_thaws_only_after_the_freeze_in_flight() -> None:
    async def run() -> list[str]:
        guest = SlowGuest()
        control = FreezeControl({"vm1": guest}, lambda txn: asyncio.sleep(0))  # type: ignore[dict-item]
        freezing = asyncio.create_task(control.freeze("t1", "vm1", "freeze", time.time() + 60))
        await asyncio.sleep(0.05)
        stopping = asyncio.create_task(control.stop())
        await asyncio.sleep(0.05)
        guest.go_on.set()
        await asyncio.wait_for(asyncio.gather(freezing, stopping), 10)
        with pytest.raises(FreezeRefusedError, match="stopping"):
            await control.freeze("t2", "vm1", "freeze", time.time() + 60)
        return guest.calls

    calls: Any = asyncio.run(run())
    assert calls == ["freeze begins", "frozen", "thawed"]
