"""A lease keepalive opens a bidirectional gRPC stream; it must be cancelled once its
one reply is read (an abandoned stream leaves grpc's request-consuming task pending:
"Task was destroyed but it is pending! ... _consume_request_iterator", seen at 100
agents)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from aetcd import rpc as etcd_rpc
from aetcd.leases import Lease

from blocktxn.coordinator.store import Store


class FakeStream:
    """A LeaseKeepAlive call: one reply, and whether it was cancelled."""

    def __init__(self) -> None:
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._replies()

    async def _replies(self) -> AsyncIterator[Any]:
        yield etcd_rpc.LeaseKeepAliveResponse(ID=7, TTL=10)
        await asyncio.sleep(3600)  # the server keeps the stream open

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def test_a_keepalive_stream_is_cancelled_after_its_reply() -> None:
    streams: list[FakeStream] = []

    class Stub:
        def LeaseKeepAlive(self, requests: Any, **kw: Any) -> FakeStream:
            streams.append(FakeStream())
            return streams[-1]

    async def scenario() -> None:
        store = Store("127.0.0.1:1")
        store.client._ready = True  # as if connected: the stub below answers
        store.client.leasestub = Stub()
        lease = Lease(7, 10, store.client)
        for _ in range(3):
            assert await store.refresh_id(lease.id)
        await store.close()

    asyncio.run(scenario())
    assert len(streams) == 3 and all(s.cancelled for s in streams)
