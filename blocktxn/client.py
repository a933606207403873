"""Typed client of the coordinator: async ``Client`` and a thin ``SyncClient``.

Errors are typed (``ClientError`` and subclasses), never raw gRPC errors.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from blocktxn.errors import InvalidInput
from blocktxn.requests import BackupOptions, BackupRequest
from blocktxn.tls import TlsFiles
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb
from blocktxn.v1 import coordinator_pb2_grpc as cpb_grpc
from blocktxn.wire import backup_request_to_pb

__all__ = ["BackupOptions", "BadRequest", "Client", "ClientError", "SyncClient", "Unreachable"]

T = TypeVar("T")
DEFAULT_ADDRESS = "127.0.0.1:7400"


class ClientError(Exception):
    """Root of the client's errors."""


class BadRequest(ClientError):
    """The request is invalid, or the coordinator refused it (INVALID_ARGUMENT /
    NOT_FOUND / FAILED_PRECONDITION)."""


class Unreachable(ClientError):
    """The coordinator did not answer (UNAVAILABLE / DEADLINE_EXCEEDED)."""


def coordinator_address(explicit: str | None = None) -> str:
    """``--coordinator``, else ``BLOCKTXN_COORDINATOR``, else 127.0.0.1:7400."""
    return explicit or os.environ.get("BLOCKTXN_COORDINATOR") or DEFAULT_ADDRESS


def _translate(err: grpc.aio.AioRpcError) -> ClientError:
    text = err.details() or err.code().name
    if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unreachable(f"coordinator unreachable: {text}")
    if err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                      grpc.StatusCode.FAILED_PRECONDITION):
        return BadRequest(text)
    return ClientError(f"{err.code().name}: {text}")


class Client:
    """Async client; use as ``async with Client(addr) as c``."""

    def __init__(self, address: str | None = None, timeout: float = 30.0,
                 tls: TlsFiles | None = None) -> None:
        self.address = coordinator_address(address)
        self.timeout = timeout
        self.channel = (tls or TlsFiles()).channel(self.address)
        self.stub = cpb_grpc.CoordinatorServiceStub(self.channel)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close(None)

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        try:
            return await make()
        except grpc.aio.AioRpcError as err:
            raise _translate(err) from err

    async def backup(self, targets: list[str], options: BackupOptions) -> cpb.Transaction:
        """Start a transaction. Raises: BadRequest, Unreachable, ClientError."""
        request = BackupRequest(tuple((t, "") for t in targets), options)
        try:
            request.check()
        except InvalidInput as err:
            raise BadRequest(str(err)) from err
        req = backup_request_to_pb(request)
        result: cpb.Transaction = await self._call(
            lambda: self.stub.StartTransaction(req, timeout=self.timeout))
        return result

    async def watch(self, txn_id: str) -> AsyncIterator[cpb.Transaction]:
        """Every change of the transaction until it is done."""
        try:
            async for txn in self.stub.WatchTransaction(cpb.GetTransactionRequest(txn_id=txn_id)):
                yield txn
        except grpc.aio.AioRpcError as err:
            raise _translate(err) from err

    async def wait(self, txn_id: str) -> cpb.Transaction:
        """Block until the transaction is done; return its final state."""
        last: cpb.Transaction | None = None
        while last is None or last.phase != cpb.TXN_PHASE_DONE:
            async for txn in self.watch(txn_id):  # (a stream cut by a leader change
                last = txn                        # is watched again)
            if last is None or last.phase != cpb.TXN_PHASE_DONE:
                await asyncio.sleep(0.2)
                last = await self.get(txn_id)
        return last

    async def get(self, txn_id: str) -> cpb.Transaction:
        result: cpb.Transaction = await self._call(lambda: self.stub.GetTransaction(
            cpb.GetTransactionRequest(txn_id=txn_id), timeout=self.timeout))
        return result

    async def list_transactions(self, open_only: bool = False) -> list[cpb.Transaction]:
        resp = await self._call(lambda: self.stub.ListTransactions(
            cpb.ListTransactionsRequest(open_only=open_only), timeout=self.timeout))
        return list(resp.transactions)

    async def cancel(self, txn_id: str, reason: str = "") -> cpb.Transaction:
        result: cpb.Transaction = await self._call(lambda: self.stub.CancelTransaction(
            cpb.CancelTransactionRequest(txn_id=txn_id, reason=reason), timeout=self.timeout))
        return result

    async def agents(self) -> list[cpb.AgentEntry]:
        resp = await self._call(lambda: self.stub.ListAgents(cpb.ListAgentsRequest(),
                                                             timeout=self.timeout))
        return list(resp.agents)

    async def audit(self, since: float, limit: int) -> list[cpb.AuditEntry]:
        resp = await self._call(lambda: self.stub.ListAudit(
            cpb.ListAuditRequest(since=since, limit=limit), timeout=self.timeout))
        return list(resp.entries)

    async def schedules(self) -> list[cpb.ScheduleInfo]:
        resp = await self._call(lambda: self.stub.ListSchedules(cpb.ListSchedulesRequest(),
                                                                timeout=self.timeout))
        return list(resp.schedules)

    async def sets(self) -> list[cpb.BackupSet]:
        resp = await self._call(lambda: self.stub.ListBackupSets(cpb.ListBackupSetsRequest(),
                                                                 timeout=self.timeout))
        return list(resp.sets)

    async def set(self, set_id: str) -> cpb.BackupSet:
        result: cpb.BackupSet = await self._call(lambda: self.stub.GetBackupSet(
            cpb.GetBackupSetRequest(set_id=set_id), timeout=self.timeout))
        return result

    async def forget(self, set_ids: list[str], wait: float = 0.0) -> cpb.PruneResult:
        """Remove sets; with *wait* > 0, wait up to that long for the removal."""
        result: cpb.PruneResult = await self._call(lambda: self.stub.ForgetSets(
            cpb.ForgetSetsRequest(set_ids=set_ids, wait=wait > 0),
            timeout=max(self.timeout, wait)))
        return result

    async def prune(self, group: str = "", dry_run: bool = False, wait: float = 0.0
                    ) -> cpb.PruneResult:
        """Apply retention; with *wait* > 0, wait up to that long for the removal."""
        result: cpb.PruneResult = await self._call(lambda: self.stub.PruneSets(
            cpb.PruneSetsRequest(group=group, dry_run=dry_run, wait=wait > 0),
            timeout=max(self.timeout, wait)))
        return result

    async def restore(self, set_id: str, target: str, destination: str,
                      fmt: str = "raw") -> apb.RestoreResponse:
        if fmt not in ("raw", "qcow2"):
            raise BadRequest(f"format {fmt!r} is not raw or qcow2")
        result: apb.RestoreResponse = await self._call(lambda: self.stub.Restore(
            cpb.CoordinatorRestoreRequest(set_id=set_id, target=target,
                                          destination=destination, format=fmt), timeout=3600))
        return result

    async def verify(self, set_id: str) -> cpb.CoordinatorVerifyResponse:
        result: cpb.CoordinatorVerifyResponse = await self._call(lambda: self.stub.Verify(
            cpb.CoordinatorVerifyRequest(set_id=set_id), timeout=3600))
        return result


class SyncClient:
    """Blocking wrapper: every coroutine of ``Client`` as a plain method."""

    def __init__(self, address: str | None = None, timeout: float = 30.0,
                 tls: TlsFiles | None = None) -> None:
        self.address, self.timeout, self.tls = coordinator_address(address), timeout, tls

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(Client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            async def run() -> Any:
                async with Client(self.address, self.timeout, self.tls) as client:
                    return await method(client, *args, **kwargs)

            return asyncio.run(run())

        return call
