"""gRPC client of the agents: deadlines on every call, tenacity retries on
retryable (transport) errors only. Every call is keyed by transaction id on
the agent side, so a retry is harmless."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from blocktxn.tls import TlsFiles
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import agent_pb2_grpc as apb_grpc

from .errors import AgentCallError

T = TypeVar("T")


def _retryable(err: BaseException) -> bool:
    return isinstance(err, AgentCallError) and err.retryable


class AgentClient:
    """One agent's AgentService."""

    def __init__(self, agent_id: str, address: str, timeout: float = 30.0,
                 tls: TlsFiles | None = None) -> None:
        self.agent_id = agent_id
        self.address = address
        self.timeout = timeout
        self.channel = (tls or TlsFiles()).channel(address)
        self.stub = apb_grpc.AgentServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close(None)

    async def _once(self, method: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            raise AgentCallError(self.agent_id, method, err.code(), err.details() or "") from err

    async def call(self, method: str, request: Any, *, timeout: float | None = None,
                   retry_for: float = 0.0) -> Any:
        """Call *method*; retry retryable failures for up to *retry_for* seconds.

        Raises:
            AgentCallError: the last failure.
        """
        rpc = getattr(self.stub, method)
        deadline = timeout or self.timeout

        async def once() -> Any:
            return await self._once(method, lambda: rpc(request, timeout=deadline))

        if retry_for <= 0:
            return await once()
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_retryable), stop=stop_after_delay(retry_for),
            wait=wait_exponential(multiplier=0.1, max=2.0), reraise=True,
        ):
            with attempt:
                return await once()
        raise AssertionError("unreachable")

    async def status(self, txn_id: str, timeout: float) -> AsyncIterator[apb.StatusUpdate]:
        """The agent's progress stream for *txn_id* (ends when no job runs)."""
        try:
            async for update in self.stub.Status(
                apb.StatusRequest(txn_id=txn_id, interval_s=0.25), timeout=timeout
            ):
                yield update
        except grpc.aio.AioRpcError as err:
            raise AgentCallError(self.agent_id, "Status", err.code(), err.details() or "") from err
