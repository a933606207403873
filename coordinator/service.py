"""CoordinatorService: proto <-> domain translation, and forwarding to the leader."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format

from blocktxn.server import start_server
from blocktxn.tls import TlsFiles
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as pb
from blocktxn.v1 import coordinator_pb2_grpc as pb_grpc
from blocktxn.wire import (
    COMPLETION_NAME,
    COMPLETION_PB,
    DECISION_PB,
    MODE_NAME,
    MODE_PB,
    PHASE_PB,
    QUIESCE_NAME,
    QUIESCE_PB,
)

from .errors import (
    AgentCallError,
    CoordinatorError,
    NotFoundError,
    NotLeaderError,
    PreconditionError,
    RequestError,
    StoreUnavailableError,
)
from .runner import Coordinator, TxnRequest

log = logging.getLogger(__name__)
T = TypeVar("T")
Ctx = grpc.aio.ServicerContext[Any, Any]

#: The one table from coordinator errors to gRPC status codes.
STATUS_OF: tuple[tuple[type[CoordinatorError], grpc.StatusCode], ...] = (
    (RequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (NotLeaderError, grpc.StatusCode.UNAVAILABLE),
    (StoreUnavailableError, grpc.StatusCode.UNAVAILABLE),
)


def status_code(err: CoordinatorError) -> grpc.StatusCode:
    if isinstance(err, AgentCallError):
        return err.code
    for cls, code in STATUS_OF:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL


async def _guard(context: Ctx, call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except CoordinatorError as err:
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, AgentCallError):
            text = err.details or text
        await context.abort(status_code(err), text)
        raise


def txn_to_pb(r: dict[str, Any]) -> pb.Transaction:
    return pb.Transaction(
        txn_id=r["txn_id"], request_id=r.get("request_id", ""),
        phase=PHASE_PB.get(r.get("phase", ""), pb.TXN_PHASE_UNSPECIFIED),
        decision=DECISION_PB.get(r.get("decision", ""), pb.DECISION_NONE),
        reason=r.get("reason", ""),
        completion=COMPLETION_PB.get(r.get("completion", ""), pb.COMPLETION_UNSPECIFIED),
        quiesce=QUIESCE_PB.get(r.get("quiesce", ""), apb.QUIESCE_UNSPECIFIED),
        members=[pb.MemberStatus(
            agent_id=m["agent_id"], vm=m["vm"], disk=m["disk"],
            mode=MODE_PB[m.get("chosen") or m["mode"]], mode_reason=m.get("mode_reason", ""),
            job_status=m.get("status", ""), bytes_done=m.get("done", 0),
            bytes_total=m.get("total", 0), outcome=m.get("outcome", ""))
            for m in r.get("members", [])],
        votes=[pb.Vote(agent_id=v["agent_id"], yes=bool(v["yes"]), reason=v["reason"])
               for v in r.get("votes", [])],
        created_at=r.get("created_at", 0.0), deadline=r.get("deadline", 0.0),
        frozen_from=r.get("frozen_from", 0.0), thawed_at=r.get("thawed_at", 0.0),
        set_id=r.get("set_id", ""), errors=r.get("errors", []),
        committed_agents=r.get("committed", []),
    )


def set_to_pb(s: dict[str, Any]) -> pb.BackupSet:
    return pb.BackupSet(
        set_id=s["set_id"], txn_id=s["txn_id"], cut_at=s["cut_at"], agents=s["agents"],
        bytes=s["bytes"],
        images=[apb.MemberImage(
            agent_id=i["agent_id"], vm=i["vm"], disk=i["disk"], set_id=s["set_id"],
            image=i["image"], backing=i["backing"], mode=MODE_PB[i["mode"]], bytes=i["bytes"],
            size=i["size"], sha256=i["sha256"], cut_at=i["cut_at"], checkpoint=i["checkpoint"])
            for i in s["images"]],
    )


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self._leader_channels: dict[str, grpc.aio.Channel] = {}

    async def _leader_stub(self) -> pb_grpc.CoordinatorServiceStub | None:
        """The leader's stub when this replica is a follower; None when it leads."""
        if self.c.epoch is not None:
            return None
        address = await self.c.leader_address()
        if address is None or address == self.c.config.advertise:
            raise NotLeaderError("no leader elected yet: retry")
        if address not in self._leader_channels:
            self._leader_channels[address] = self.c.config.tls.channel(address)
        return pb_grpc.CoordinatorServiceStub(self._leader_channels[address])

    async def _forward(self, context: Ctx, method: str, request: Any) -> Any:
        stub = await _guard(context, self._leader_stub)
        if stub is None:
            return None
        try:
            return await getattr(stub, method)(request, timeout=context.time_remaining() or 60)
        except grpc.aio.AioRpcError as err:
            await context.abort(err.code(), err.details() or "")

    async def RegisterAgent(self, request: pb.RegisterAgentRequest, context: Ctx
                            ) -> pb.RegisterAgentResponse:
        inventory = json_format.MessageToDict(request.inventory, preserving_proto_field_name=True)
        await _guard(context, lambda: self.c.register_agent(
            request.agent_id, request.address, inventory))
        return pb.RegisterAgentResponse(heartbeat_s=3.0)

    async def ListAgents(self, request: pb.ListAgentsRequest, context: Ctx
                         ) -> pb.ListAgentsResponse:
        entries, live = await _guard(context, self.c.store.agents)
        return pb.ListAgentsResponse(agents=[
            pb.AgentEntry(agent_id=e["agent_id"], address=e["address"],
                          live=e["agent_id"] in live, last_seen=e["last_seen"],
                          inventory=json_format.ParseDict(e["inventory"], apb.Inventory(),
                                                          ignore_unknown_fields=True))
            for e in sorted(entries, key=lambda e: str(e["agent_id"]))])

    async def StartTransaction(self, request: pb.StartTransactionRequest, context: Ctx
                               ) -> pb.Transaction:
        forwarded = await self._forward(context, "StartTransaction", request)
        if forwarded is not None:
            return forwarded  # type: ignore[no-any-return]

        async def call() -> dict[str, Any]:
            checks: list[tuple[int, dict[Any, str], str]] = [
                (request.mode, MODE_NAME, "mode"), (request.quiesce, QUIESCE_NAME, "quiesce"),
                (request.completion, COMPLETION_NAME, "completion"),
                *((t.mode, MODE_NAME, "target mode") for t in request.targets),
            ]
            for enum_value, table, what in checks:
                if enum_value not in table:
                    raise RequestError(f"unknown {what} {enum_value}")
            return await self.c.start_transaction(TxnRequest(
                request_id=request.request_id,
                targets=[(t.target, MODE_NAME[t.mode]) for t in request.targets],
                mode=MODE_NAME[request.mode] or "auto",
                completion=COMPLETION_NAME[request.completion],
                quiesce=QUIESCE_NAME[request.quiesce],
                freeze_timeout=request.freeze_timeout_s, deadline=request.deadline_s,
                speed=request.speed))

        return txn_to_pb(await _guard(context, call))

    async def GetTransaction(self, request: pb.GetTransactionRequest, context: Ctx
                             ) -> pb.Transaction:
        return txn_to_pb(await _guard(context, lambda: self.c.get(request.txn_id)))

    async def ListTransactions(self, request: pb.ListTransactionsRequest, context: Ctx
                               ) -> pb.ListTransactionsResponse:
        records = await _guard(context, lambda: self.c.list_txns(request.open_only))
        return pb.ListTransactionsResponse(transactions=[txn_to_pb(r) for r in records])

    async def WatchTransaction(self, request: pb.GetTransactionRequest, context: Ctx
                               ) -> AsyncIterator[pb.Transaction]:
        stub = await _guard(context, self._leader_stub)
        if stub is not None:
            try:
                stream: Any = stub.WatchTransaction(request)
                async for t in stream:
                    yield t
            except grpc.aio.AioRpcError as err:
                await context.abort(err.code(), err.details() or "")
            return
        try:
            async for record in self.c.watch(request.txn_id):
                yield txn_to_pb(record)
        except CoordinatorError as err:
            await context.abort(status_code(err), str(err))

    async def CancelTransaction(self, request: pb.CancelTransactionRequest, context: Ctx
                                ) -> pb.Transaction:
        forwarded = await self._forward(context, "CancelTransaction", request)
        if forwarded is not None:
            return forwarded  # type: ignore[no-any-return]
        return txn_to_pb(await _guard(context, lambda: self.c.cancel(request.txn_id,
                                                                     request.reason)))

    async def QueryDecision(self, request: pb.QueryDecisionRequest, context: Ctx
                            ) -> pb.QueryDecisionResponse:
        decision, reason = await _guard(context, lambda: self.c.query_decision(request.txn_id))
        return pb.QueryDecisionResponse(decision=DECISION_PB[decision], reason=reason)

    async def ListBackupSets(self, request: pb.ListBackupSetsRequest, context: Ctx
                             ) -> pb.ListBackupSetsResponse:
        sets = await _guard(context, self.c.store.sets)
        return pb.ListBackupSetsResponse(
            sets=[set_to_pb(s) for s in sorted(sets, key=lambda s: float(s["cut_at"]))])

    async def GetBackupSet(self, request: pb.GetBackupSetRequest, context: Ctx
                           ) -> pb.BackupSet:
        return set_to_pb(await _guard(context, lambda: self.c.backup_set(request.set_id)))

    async def Restore(self, request: pb.CoordinatorRestoreRequest, context: Ctx
                      ) -> apb.RestoreResponse:
        resp: apb.RestoreResponse = await _guard(context, lambda: self.c.restore(
            request.set_id, request.target, request.destination, request.format))
        return resp

    async def Verify(self, request: pb.CoordinatorVerifyRequest, context: Ctx
                     ) -> pb.CoordinatorVerifyResponse:
        checks = await _guard(context, lambda: self.c.verify(request.set_id))
        return pb.CoordinatorVerifyResponse(
            ok=all(ok for _, ok, _ in checks),
            checks=[apb.ImageCheck(image=i, ok=ok, problem=p) for i, ok, p in checks])


async def serve(coordinator: Coordinator, listen: str, tls: TlsFiles | None = None
                ) -> grpc.aio.Server:
    """Start the gRPC server for *coordinator* on *listen*, TLS if configured."""
    return await start_server(
        lambda s: pb_grpc.add_CoordinatorServiceServicer_to_server(
            CoordinatorServicer(coordinator), s),
        pb.DESCRIPTOR.services_by_name["CoordinatorService"].full_name, listen, tls)
