"""CoordinatorService: proto <-> domain translation only. Errors become statuses
through the shared guard; calls only the leader can answer go through the proxy."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from blocktxn.errors import BlocktxnError, InvalidInput
from blocktxn.server import abort_with, guard, start_server
from blocktxn.tls import TlsFiles
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as pb
from blocktxn.v1 import coordinator_pb2_grpc as pb_grpc
from blocktxn.wire import (
    COMPLETION_PB,
    DECISION_PB,
    MODE_PB,
    PHASE_PB,
    QUIESCE_PB,
    backup_request_from_pb,
)

from .audit import Auditor
from .proxy import LeaderProxy
from .records import AgentEntry, AgentInventory, BackupSet, DiskEntry, TxnRecord, VmEntry
from .registry import HEARTBEAT_S
from .runner import Coordinator
from .scheduler import PREFIX as SCHEDULED

Ctx = grpc.aio.ServicerContext[Any, Any]


def txn_to_pb(r: TxnRecord) -> pb.Transaction:
    return pb.Transaction(
        txn_id=r.txn_id, request_id=r.request_id,
        phase=PHASE_PB.get(r.phase.value, pb.TXN_PHASE_UNSPECIFIED),
        decision=DECISION_PB[r.decision.value if r.decision else ""], reason=r.reason,
        completion=COMPLETION_PB.get(r.completion, pb.COMPLETION_UNSPECIFIED),
        quiesce=QUIESCE_PB.get(r.quiesce, apb.QUIESCE_UNSPECIFIED),
        members=[pb.MemberStatus(
            agent_id=m.agent_id, vm=m.vm, disk=m.disk,
            mode=MODE_PB.get(m.chosen or m.mode, apb.BACKUP_MODE_UNSPECIFIED),
            mode_reason=m.mode_reason, job_status=m.status, bytes_done=m.done,
            bytes_total=m.total, outcome=m.outcome) for m in r.members],
        votes=[pb.Vote(agent_id=v.agent_id, yes=v.yes, reason=v.reason, at=v.at)
               for v in r.votes],
        created_at=r.created_at, deadline=r.deadline, frozen_from=r.frozen_from,
        thawed_at=r.thawed_at, set_id=r.set_id, errors=r.errors,
        committed_agents=r.committed, group=r.group, cut_done_at=r.cut_done_at,
        decided_at=r.decided_at, done_at=r.done_at,
    )


def set_to_pb(s: BackupSet) -> pb.BackupSet:
    return pb.BackupSet(
        set_id=s.set_id, txn_id=s.txn_id, cut_at=s.cut_at, agents=s.agents, bytes=s.bytes,
        group=s.group, created_at=s.created_at,
        images=[apb.MemberImage(
            agent_id=i.agent_id, vm=i.vm, disk=i.disk, set_id=s.set_id, image=i.image,
            backing=i.backing, mode=MODE_PB.get(i.mode, apb.BACKUP_MODE_UNSPECIFIED),
            bytes=i.bytes, size=i.size, sha256=i.sha256, cut_at=i.cut_at,
            checkpoint=i.checkpoint) for i in s.images],
    )


def inventory_from_pb(inv: apb.Inventory) -> AgentInventory:
    return AgentInventory(
        inv.agent_id,
        tuple(VmEntry(v.name, v.connected,
                      tuple(DiskEntry(d.name, d.size, d.format, d.checkpoint,
                                      d.checkpoint_usable, d.checkpoint_problem, d.busy_txn)
                            for d in v.disks),
                      tuple(v.jobs), v.frozen, v.has_guest_agent) for v in inv.vms),
        tuple(inv.open_transactions), inv.repo_capacity, inv.repo_free)


def inventory_to_pb(inv: AgentInventory) -> apb.Inventory:
    return apb.Inventory(
        agent_id=inv.agent_id, open_transactions=inv.open_transactions,
        repo_capacity=inv.repo_capacity, repo_free=inv.repo_free,
        vms=[apb.VmInfo(name=v.name, connected=v.connected, jobs=v.jobs, frozen=v.frozen,
                        has_guest_agent=v.has_guest_agent,
                        disks=[apb.DiskInfo(name=d.name, size=d.size, format=d.format,
                                            checkpoint=d.checkpoint,
                                            checkpoint_usable=d.checkpoint_usable,
                                            checkpoint_problem=d.checkpoint_problem,
                                            busy_txn=d.busy_txn) for d in v.disks])
             for v in inv.vms])


def _wait_for(wait: bool, context: Ctx) -> float:
    """How long a call asked to wait may wait: until just before its deadline."""
    if not wait:
        return 0.0
    remaining = context.time_remaining()
    return 3600.0 if remaining is None else max(0.0, remaining - 1.0)


def agent_to_pb(e: AgentEntry, live: bool) -> pb.AgentEntry:
    return pb.AgentEntry(agent_id=e.agent_id, address=e.address, live=live,
                         last_seen=e.last_seen, inventory=inventory_to_pb(e.inventory))


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self.proxy = LeaderProxy(coordinator)

    async def RegisterAgent(self, request: pb.RegisterAgentRequest, context: Ctx
                            ) -> pb.RegisterAgentResponse:
        if not request.HasField("inventory"):
            known = await guard(context, lambda: self.c.heartbeat(
                request.agent_id, request.address, request.inventory_digest))
            return pb.RegisterAgentResponse(heartbeat_s=HEARTBEAT_S, send_inventory=not known,
                                             heartbeat_address=self.c.heartbeat_address)
        inventory = inventory_from_pb(request.inventory)
        await guard(context, lambda: self.c.register_agent(
            request.agent_id, request.address, inventory, request.inventory_digest))
        return pb.RegisterAgentResponse(heartbeat_s=HEARTBEAT_S,
                                        heartbeat_address=self.c.heartbeat_address)

    async def ListAgents(self, request: pb.ListAgentsRequest, context: Ctx
                         ) -> pb.ListAgentsResponse:
        entries, live = await guard(context, self.c.agents)
        return pb.ListAgentsResponse(agents=[
            agent_to_pb(e, e.agent_id in live) for e in sorted(entries, key=lambda e: e.agent_id)])

    async def StartTransaction(self, request: pb.StartTransactionRequest, context: Ctx
                               ) -> pb.Transaction:
        if request.request_id.startswith(SCHEDULED):
            await abort_with(context, InvalidInput(
                f"request id {request.request_id!r}: ids starting with {SCHEDULED!r} are "
                "the scheduler's"))
        forwarded = await self.proxy.forward(
            context, lambda stub, t: stub.StartTransaction(request, timeout=t))
        if forwarded is not None:
            return forwarded

        async def start() -> TxnRecord:
            return await self.c.start_transaction(backup_request_from_pb(request))

        return txn_to_pb(await guard(context, start))

    async def GetTransaction(self, request: pb.GetTransactionRequest, context: Ctx
                             ) -> pb.Transaction:
        return txn_to_pb(await guard(context, lambda: self.c.get(request.txn_id)))

    async def ListTransactions(self, request: pb.ListTransactionsRequest, context: Ctx
                               ) -> pb.ListTransactionsResponse:
        records = await guard(context, lambda: self.c.list_txns(request.open_only))
        return pb.ListTransactionsResponse(transactions=[txn_to_pb(r) for r in records])

    async def WatchTransaction(self, request: pb.GetTransactionRequest, context: Ctx
                               ) -> AsyncIterator[pb.Transaction]:
        stub = await guard(context, self.proxy.stub)
        if stub is not None:
            async for txn in self.proxy.watch(context, stub, request):
                yield txn
            return
        try:
            async for record in self.c.watch(request.txn_id):
                yield txn_to_pb(record)
        except BlocktxnError as err:
            await abort_with(context, err)

    async def CancelTransaction(self, request: pb.CancelTransactionRequest, context: Ctx
                                ) -> pb.Transaction:
        forwarded = await self.proxy.forward(
            context, lambda stub, t: stub.CancelTransaction(request, timeout=t))
        if forwarded is not None:
            return forwarded
        return txn_to_pb(await guard(context, lambda: self.c.cancel(request.txn_id,
                                                                    request.reason)))

    async def QueryDecision(self, request: pb.QueryDecisionRequest, context: Ctx
                            ) -> pb.QueryDecisionResponse:
        decision = await guard(context, lambda: self.c.query_decision(request.txn_id))
        if decision is None:
            return pb.QueryDecisionResponse(decision=pb.DECISION_NONE)
        return pb.QueryDecisionResponse(decision=DECISION_PB[decision.decision.value],
                                        reason=decision.reason)

    async def ListBackupSets(self, request: pb.ListBackupSetsRequest, context: Ctx
                             ) -> pb.ListBackupSetsResponse:
        sets = await guard(context, self.c.sets)
        return pb.ListBackupSetsResponse(sets=[set_to_pb(s) for s in sets])

    async def GetBackupSet(self, request: pb.GetBackupSetRequest, context: Ctx
                           ) -> pb.BackupSet:
        return set_to_pb(await guard(context, lambda: self.c.backup_set(request.set_id)))

    async def Restore(self, request: pb.CoordinatorRestoreRequest, context: Ctx
                      ) -> apb.RestoreResponse:
        result = await guard(context, lambda: self.c.restore(
            request.set_id, request.target, request.destination, request.format))
        return apb.RestoreResponse(path=result.path, bytes=result.bytes)

    async def ForgetSets(self, request: pb.ForgetSetsRequest, context: Ctx
                         ) -> pb.PruneResult:
        forwarded = await self.proxy.forward(
            context, lambda stub, t: stub.ForgetSets(request, timeout=t))
        if forwarded is not None:
            return forwarded
        prune_id, sets, done = await guard(
            context, lambda: self.c.forget(list(request.set_ids), _wait_for(request.wait,
                                                                             context)))
        return pb.PruneResult(prune_id=prune_id, done=done, sets=[
            pb.SetVerdict(set_id=s.set_id, group=s.group, time=s.time, keep=False)
            for s in sets])

    async def PruneSets(self, request: pb.PruneSetsRequest, context: Ctx
                        ) -> pb.PruneResult:
        forwarded = await self.proxy.forward(
            context, lambda stub, t: stub.PruneSets(request, timeout=t))
        if forwarded is not None:
            return forwarded
        prune_id, rows, done = await guard(
            context, lambda: self.c.prune(request.group, request.dry_run,
                                          _wait_for(request.wait, context)))
        return pb.PruneResult(prune_id=prune_id, done=done, sets=[
            pb.SetVerdict(set_id=s.set_id, group=s.group, time=s.time, keep=v.keep,
                          reasons=v.reasons) for s, v in rows])

    async def ListAudit(self, request: pb.ListAuditRequest, context: Ctx
                        ) -> pb.ListAuditResponse:
        records = await guard(context, lambda: self.c.audit(request.since, request.limit))
        return pb.ListAuditResponse(entries=[
            pb.AuditEntry(at=r.at, identity=r.identity, role=r.role, method=r.method,
                          request=r.request, code=r.code, detail=r.detail) for r in records])

    async def ListSchedules(self, request: pb.ListSchedulesRequest, context: Ctx
                            ) -> pb.ListSchedulesResponse:
        rows = await guard(context, self.c.schedules)
        out = []
        for schedule, state, record in rows:
            last = state.last_at if state and state.outcome != "created" else 0.0
            info = pb.ScheduleInfo(
                name=schedule.name, cron=schedule.cron, targets=schedule.targets,
                mode=schedule.options.mode, quiesce=schedule.options.quiesce,
                group=schedule.options.group, catch_up=schedule.catch_up,
                next_at=schedule.next_after(state.last_at if state else time.time()),
                last_at=last)
            if state is not None and last:
                info.last_outcome, info.last_txn_id = state.outcome, state.txn_id
                info.last_reason = state.error
            if record is not None and record.decision is not None:
                info.last_decision = record.decision.value
                info.last_reason = record.reason
            out.append(info)
        return pb.ListSchedulesResponse(schedules=out)

    async def Verify(self, request: pb.CoordinatorVerifyRequest, context: Ctx
                     ) -> pb.CoordinatorVerifyResponse:
        checks = await guard(context, lambda: self.c.verify(request.set_id))
        return pb.CoordinatorVerifyResponse(
            ok=all(c.ok for c in checks),
            checks=[apb.ImageCheck(image=c.image, ok=c.ok, problem=c.problem) for c in checks])


async def serve(coordinator: Coordinator, listen: str, tls: TlsFiles | None = None,
                health: Any = None) -> grpc.aio.Server:
    """Start the gRPC server for *coordinator* on *listen*, TLS if configured, with
    *health* as its health servicer if given (``upkeep.Health``).

    Raises:
        OSError: the address cannot be bound.
    """
    return await start_server(
        lambda s: pb_grpc.add_CoordinatorServiceServicer_to_server(
            CoordinatorServicer(coordinator), s),
        pb.DESCRIPTOR.services_by_name["CoordinatorService"].full_name, listen, tls, health,
        [Auditor(coordinator.store).interceptor(coordinator.config.roles)])
