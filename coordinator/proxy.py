"""Follower -> leader forwarding: a replica that does not lead passes the calls only
the leader can answer (start, cancel, watch) to the replica that does."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from blocktxn.access import FORWARDED, OnBehalfOf
from blocktxn.server import guard
from blocktxn.v1 import coordinator_pb2 as pb
from blocktxn.v1 import coordinator_pb2_grpc as pb_grpc

from .errors import NotLeaderError

if TYPE_CHECKING:
    from blocktxn.v1.coordinator_pb2_grpc import CoordinatorServiceAsyncStub as Stub

    from .runner import Coordinator

T = TypeVar("T")
Ctx = grpc.aio.ServicerContext[Any, Any]


class LeaderProxy:
    """Channels to the current leader, opened on first use and kept."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def stub(self) -> Stub | None:
        """The leader's stub when this replica is a follower; None when it leads.

        Raises:
            NotLeaderError: no leader is elected yet.
            StoreUnavailableError, StoreCorruptError.
        """
        if self.c.leads:
            return None
        address = await self.c.leader_address()
        if address is None or address == self.c.config.advertise:
            raise NotLeaderError("no leader elected yet: retry")
        if address not in self._channels:
            self._channels[address] = self.c.config.tls.channel(address, [OnBehalfOf()])
        return pb_grpc.CoordinatorServiceStub(self._channels[address])

    async def forward(self, context: Ctx, call: Callable[[Stub, float], Awaitable[T]]
                      ) -> T | None:
        """The leader's answer to ``call(stub, deadline)``; None when this replica leads.

        Raises:
            grpc's abort exception: no leader, or the leader's failure (its status).
        """
        stub = await guard(context, self.stub)
        if stub is None:
            return None
        FORWARDED.set(True)  # the leader audits it, with the caller's identity
        try:
            return await call(stub, context.time_remaining() or 60)
        except grpc.aio.AioRpcError as err:
            await context.abort(err.code(), err.details() or "")
            raise  # unreachable: abort raises

    async def watch(self, context: Ctx, stub: Stub, request: pb.GetTransactionRequest
                    ) -> AsyncIterator[pb.Transaction]:
        """The leader's WatchTransaction stream, passed on.

        Raises:
            grpc's abort exception: the leader's failure, with its status.
        """
        try:
            async for txn in stub.WatchTransaction(request):
                yield txn
        except grpc.aio.AioRpcError as err:
            await context.abort(err.code(), err.details() or "")
