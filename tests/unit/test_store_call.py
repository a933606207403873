"""Store._call when its caller is cancelled (a client gave up on its RPC): the etcd
request left behind may still fail, and that failure must not surface as asyncio's
"Task exception was never retrieved" (an ERROR line in a clean run's log)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any

from blocktxn.coordinator.store import Store


async def _fails_when_cancelled() -> None:
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        raise RuntimeError("Internal error from Core") from None


def test_a_request_failing_after_its_caller_was_cancelled_is_not_reported() -> None:
    reported: list[dict[str, Any]] = []

    async def run() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: reported.append(ctx))
        store = Store("127.0.0.1:1")
        caller = asyncio.create_task(store._call("keepalive", _fails_when_cancelled))
        await asyncio.sleep(0.05)
        caller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        await asyncio.sleep(0.05)
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(run())
    gc.collect()
    assert [c.get("message") for c in reported] == []
