"""A daemon given a port another daemon already listens on fails to start, with a clear
error, instead of silently sharing the port with it (gRPC's default SO_REUSEPORT let
both bind, and connections went to either)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from blocktxn.server import ListenError, start_server


def test_a_port_in_use_is_refused() -> None:
    async def run() -> None:
        ports: list[int] = []
        first = await start_server(lambda s: None, "blocktxn.v1.AgentService",
                                   "127.0.0.1:0", None, on_port=ports.append)
        second: grpc.aio.Server | None = None
        try:
            with pytest.raises(ListenError, match="cannot listen"):
                second = await start_server(lambda s: None, "blocktxn.v1.AgentService",
                                            f"127.0.0.1:{ports[0]}", None)
        finally:
            await first.stop(None)
            if second is not None:
                await second.stop(None)

    asyncio.run(run())
