"""Webhook notifications: a POST whose host name never resolves (a resolver that hangs)
gives up at its deadline and never takes the threads the coordinator's other blocking
work runs on (the event loop's default executor)."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import pytest

from blocktxn.coordinator import notify

HANGING = 10  # notifications at once: more than the default executor's threads


def test_a_hanging_name_lookup_neither_blocks_the_loop_nor_lasts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    lookups: list[str] = []

    def hang(host: str, *args: Any, **kwargs: Any) -> Any:
        lookups.append(host)
        release.wait(60)          # a resolver that does not answer
        raise socket.gaierror("released by the test")

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    monkeypatch.setattr(notify, "TIMEOUT", 0.5)
    monkeypatch.setattr(notify, "LOOKUP_SLACK", 0.5)

    async def run() -> None:
        notifier = notify.Notifier(attempts=2, first_wait=0.01)
        for i in range(HANGING):
            notifier.send(f"http://hook-{i}.invalid/x", {"n": i})
        await asyncio.sleep(0.2)
        # the loop's own blocking work still gets a thread at once
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 7), 10) == 7
        # and every notification gives up (its attempts end at their deadline)
        await asyncio.wait_for(asyncio.gather(*notifier._pending), 30)

    try:
        asyncio.run(run())
    finally:
        release.set()
    assert lookups
