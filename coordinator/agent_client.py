"""gRPC client of one agent: one typed method per AgentService call the coordinator
makes, domain types in and out (protobufs stay in this file). Deadlines on every
call; tenacity retries on retryable (transport) errors only. Every call is keyed by
transaction id on the agent side, so a retry is harmless."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from blocktxn.requests import DiskRequest, check_cut
from blocktxn.tls import TlsFiles
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import agent_pb2_grpc as apb_grpc
from blocktxn.wire import MODE_NAME, QUIESCE_PB, disk_requests_to_pb

from .errors import AgentCallError
from .records import SetImage

T = TypeVar("T")


@dataclass(frozen=True)
class ChosenMode:
    """How the agent backs up one disk, decided at the cut."""

    vm: str
    disk: str
    mode: str                # full | incremental
    reason: str
    bytes_total: int


@dataclass(frozen=True)
class CutResult:
    disks: tuple[ChosenMode, ...]
    frozen_at: float         # 0: no freeze
    cut_at: float = 0.0      # 0: not cut (a stage)


@dataclass(frozen=True)
class ThawResult:
    thawed_on_own: bool      # the freeze deadline passed first
    thawed_at: float


@dataclass(frozen=True)
class PreparedDisk:
    vm: str
    disk: str
    bytes: int               # copied


@dataclass(frozen=True)
class Ballot:
    """An agent's vote, with what it prepared when YES."""

    yes: bool
    reason: str
    prepared: tuple[PreparedDisk, ...]
    left_out: tuple[str, ...] = ()  # individual, YES: "vm/disk: why" rolled back


@dataclass(frozen=True)
class DiskProgress:
    vm: str
    disk: str
    job_status: str
    bytes_done: int
    bytes_total: int


@dataclass(frozen=True)
class RestoreResult:
    path: str
    bytes: int


@dataclass(frozen=True)
class ImageCheck:
    image: str
    ok: bool
    problem: str


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

    def _error(self, method: str, err: grpc.aio.AioRpcError) -> AgentCallError:
        return AgentCallError(self.agent_id, method, err.code(), err.details() or "")

    async def _call(self, method: str, rpc: Callable[[float], Awaitable[T]], *,
                    timeout: float | None = None, retry_for: float = 0.0) -> T:
        """``rpc(deadline)``; retry retryable failures for up to *retry_for* seconds."""
        deadline = timeout or self.timeout

        async def once() -> T:
            try:
                return await rpc(deadline)
            except grpc.aio.AioRpcError as err:
                raise self._error(method, err) from err

        if retry_for <= 0:
            return await once()
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_retryable), stop=stop_after_delay(retry_for),
            wait=wait_exponential(multiplier=0.1, max=2.0), reraise=True,
        ):
            with attempt:
                return await once()
        raise AssertionError("unreachable")

    async def cut(self, txn_id: str, disks: list[DiskRequest], quiesce: str,
                  freeze_timeout: float, individual: bool = False,
                  stage_only: bool = False) -> CutResult:
        """Quiesce, add the checkpoints and start the jobs; with *stage_only*, only
        stage them (retried for 5 s).

        Raises:
            InvalidInput: a value the agent would refuse (nothing is sent).
            AgentCallError.
        """
        check_cut(txn_id, disks, quiesce, freeze_timeout)
        req = apb.CutRequest(txn_id=txn_id, quiesce=QUIESCE_PB[quiesce],
                             freeze_timeout_s=freeze_timeout, individual=individual,
                             members=disk_requests_to_pb(disks), stage_only=stage_only)
        resp = await self._call("Cut", lambda t: self.stub.Cut(req, timeout=t), retry_for=5)
        return CutResult(tuple(ChosenMode(m.vm, m.disk, MODE_NAME.get(m.mode, ""),
                                          m.mode_reason, m.bytes_total) for m in resp.members),
                         resp.frozen_at, resp.cut_at)

    async def thaw(self, txn_id: str) -> ThawResult:
        """Raises: AgentCallError."""
        req = apb.ThawRequest(txn_id=txn_id)
        resp = await self._call("Thaw", lambda t: self.stub.Thaw(req, timeout=t), retry_for=5)
        return ThawResult(resp.thawed_on_own, resp.thawed_at)

    async def prepare(self, txn_id: str, wait: float) -> Ballot:
        """Ask for the vote, letting the jobs run up to *wait* seconds.

        Raises:
            AgentCallError.
        """
        req = apb.PrepareRequest(txn_id=txn_id, timeout_s=wait)
        resp = await self._call("Prepare", lambda t: self.stub.Prepare(req, timeout=t),
                                timeout=wait + 5, retry_for=wait)
        return Ballot(resp.yes, resp.reason,
                      tuple(PreparedDisk(i.vm, i.disk, i.bytes) for i in resp.images),
                      tuple(resp.left_out))

    async def commit(self, txn_id: str) -> tuple[SetImage, ...]:
        """The agent's committed images. Raises: AgentCallError."""
        req = apb.CommitRequest(txn_id=txn_id)
        resp = await self._call("Commit", lambda t: self.stub.Commit(req, timeout=t))
        return tuple(SetImage(self.agent_id, i.vm, i.disk, i.image, i.backing,
                              MODE_NAME.get(i.mode, ""), i.bytes, i.size, i.sha256, i.cut_at,
                              i.checkpoint) for i in resp.images)

    async def forget(self, set_id: str, check_only: bool = False) -> int:
        """Ask the agent to remove its images of *set_id*; how many are left (0: all
        gone). *check_only*: only ask whether it may start now. Raises: AgentCallError."""
        req = apb.ForgetImagesRequest(set_id=set_id, check_only=check_only)
        resp = await self._call("ForgetImages", lambda t: self.stub.ForgetImages(req, timeout=t))
        return 0 if resp.done else max(1, resp.remaining)

    async def abort(self, txn_id: str, reason: str) -> None:
        """Raises: AgentCallError."""
        req = apb.AbortRequest(txn_id=txn_id, reason=reason)
        await self._call("Abort", lambda t: self.stub.Abort(req, timeout=t))

    async def status(self, txn_id: str, timeout: float
                     ) -> AsyncIterator[tuple[DiskProgress, ...]]:
        """The agent's progress stream for *txn_id* (ends when no job runs).

        Raises:
            AgentCallError.
        """
        req = apb.StatusRequest(txn_id=txn_id, interval_s=0.25)
        try:
            async for update in self.stub.Status(req, timeout=timeout):
                yield tuple(DiskProgress(d.vm, d.disk, d.job_status, d.bytes_done,
                                         d.bytes_total) for d in update.disks)
        except grpc.aio.AioRpcError as err:
            raise self._error("Status", err) from err

    async def restore(self, set_id: str, vm: str, disk: str, destination: str, fmt: str
                      ) -> RestoreResult:
        """Raises: AgentCallError."""
        req = apb.RestoreRequest(set_id=set_id, vm=vm, disk=disk, destination=destination,
                                 format=fmt or "raw")
        resp = await self._call("Restore", lambda t: self.stub.Restore(req, timeout=t),
                                timeout=3600)
        return RestoreResult(resp.path, resp.bytes)

    async def verify(self, set_id: str) -> tuple[ImageCheck, ...]:
        """Raises: AgentCallError."""
        req = apb.VerifyRequest(set_id=set_id)
        resp = await self._call("Verify", lambda t: self.stub.Verify(req, timeout=t),
                                timeout=3600)
        return tuple(ImageCheck(c.image, c.ok, c.problem) for c in resp.checks)
