"""AgentService: proto <-> domain translation only; the work is in the runner."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from blocktxn.access import AccessInterceptor
from blocktxn.errors import BlocktxnError
from blocktxn.requests import check_interval, check_reason, check_wait
from blocktxn.server import Ctx, abort_with, guard, start_server
from blocktxn.tls import TlsFiles
from blocktxn.v1 import agent_pb2 as pb
from blocktxn.v1 import agent_pb2_grpc as pb_grpc
from blocktxn.wire import MODE_PB, QUIESCE_NAME, disk_requests_from_pb, name_of

from .participant import TxnState
from .participant_messages import ImageRecord, Phase
from .runner import AgentRunner

log = logging.getLogger(__name__)

PHASE_TO_PB = {
    Phase.CUTTING: pb.PARTICIPANT_PHASE_CUTTING, Phase.FROZEN: pb.PARTICIPANT_PHASE_FROZEN,
    Phase.RUNNING: pb.PARTICIPANT_PHASE_RUNNING, Phase.PREPARED: pb.PARTICIPANT_PHASE_PREPARED,
    Phase.VOTED_NO: pb.PARTICIPANT_PHASE_VOTED_NO,
    Phase.COMMITTED: pb.PARTICIPANT_PHASE_COMMITTED, Phase.ABORTED: pb.PARTICIPANT_PHASE_ABORTED,
}


def image_to_pb(i: ImageRecord) -> pb.MemberImage:
    return pb.MemberImage(
        vm=i.vm, disk=i.disk, set_id=i.set_id, image=i.image, backing=i.backing,
        mode=MODE_PB[i.mode], bytes=i.bytes, size=i.size, sha256=i.sha256, cut_at=i.cut_at,
        checkpoint=i.checkpoint,
    )


def cut_to_pb(st: TxnState) -> pb.CutResponse:
    return pb.CutResponse(
        txn_id=st.txn_id, frozen_at=st.frozen_at, cut_at=st.cut_at,
        freeze_deadline=st.freeze_deadline if st.frozen_at else 0.0,
        members=[
            pb.MemberResult(
                vm=m.vm, disk=m.disk, mode=MODE_PB[m.mode], mode_reason=m.mode_reason,
                checkpoint=m.new_bitmap, previous_checkpoint=m.sync_bitmap or "",
                bytes_total=st.bytes_total.get(m.key, 0),
            )
            for m in st.members
        ],
    )


async def inventory_to_pb(runner: AgentRunner) -> pb.Inventory:
    vms = await runner.inventory()
    capacity, free = runner.repo.space()
    step = max(1, capacity // 256)  # coarse: an idle heartbeat must not see a change
    return pb.Inventory(
        agent_id=runner.config.agent_id,
        repo_capacity=capacity, repo_free=free // step * step,
        open_transactions=runner.machine.open_txns(),
        vms=[
            pb.VmInfo(
                name=v.name, connected=v.connected, jobs=list(v.jobs), frozen=v.frozen,
                has_guest_agent=v.has_guest_agent,
                disks=[pb.DiskInfo(name=d.name, size=d.size, format=d.format,
                                   checkpoint=d.checkpoint, checkpoint_usable=d.usable,
                                   checkpoint_problem=d.problem, busy_txn=d.busy_txn)
                       for d in v.disks],
            )
            for v in vms
        ],
    )


class AgentServicer(pb_grpc.AgentServiceServicer):
    def __init__(self, runner: AgentRunner) -> None:
        self.runner = runner

    async def GetInventory(self, request: pb.GetInventoryRequest,
                           context: Ctx) -> pb.Inventory:
        return await guard(context, lambda: inventory_to_pb(self.runner))

    async def Cut(self, request: pb.CutRequest,
                  context: Ctx) -> pb.CutResponse:
        async def call() -> TxnState:
            return await self.runner.cut(
                request.txn_id, disk_requests_from_pb(list(request.members)),
                name_of(QUIESCE_NAME, request.quiesce, "quiesce"), request.freeze_timeout_s,
                request.individual, request.stage_only)

        return cut_to_pb(await guard(context, call))

    async def Thaw(self, request: pb.ThawRequest,
                   context: Ctx) -> pb.ThawResponse:
        st = await guard(context, lambda: self.runner.thaw(request.txn_id))
        return pb.ThawResponse(thawed_on_own=st.thawed_on_own, thawed_at=st.thawed_at)

    async def Status(self, request: pb.StatusRequest,
                     context: Ctx) -> AsyncIterator[pb.StatusUpdate]:
        try:
            interval = check_interval(request.interval_s)
            async for st, disks in self.runner.status(request.txn_id, interval):
                yield pb.StatusUpdate(
                    txn_id=st.txn_id, phase=PHASE_TO_PB[st.phase], failure=st.failure,
                    disks=[pb.DiskProgress(vm=d.vm, disk=d.disk, job_status=d.status,
                                           bytes_done=d.done, bytes_total=d.total,
                                           error=d.error) for d in disks],
                )
        except BlocktxnError as err:
            await abort_with(context, err)

    async def Prepare(self, request: pb.PrepareRequest,
                      context: Ctx) -> pb.PrepareResponse:
        st = await guard(context, lambda: self.runner.prepare(
            request.txn_id, check_wait(request.timeout_s, "prepare timeout")))
        if st.phase in (Phase.PREPARED, Phase.COMMITTED):
            return pb.PrepareResponse(
                yes=True, images=[image_to_pb(i) for i in st.images],
                left_out=[f"{vm}/{disk}: {why}" for vm, disk, why in st.left_out])
        return pb.PrepareResponse(yes=False, reason=st.failure or st.abort_reason or "aborted")

    async def Commit(self, request: pb.CommitRequest,
                     context: Ctx) -> pb.CommitResponse:
        st = await guard(context, lambda: self.runner.commit(request.txn_id))
        return pb.CommitResponse(images=[image_to_pb(i) for i in st.images])

    async def Abort(self, request: pb.AbortRequest,
                    context: Ctx) -> pb.AbortResponse:
        await guard(context, lambda: self.runner.abort(request.txn_id,
                                                        check_reason(request.reason)))
        return pb.AbortResponse()

    async def ForgetImages(self, request: pb.ForgetImagesRequest,
                           context: Ctx) -> pb.ForgetImagesResponse:
        left = await guard(context, lambda: self.runner.forget(request.set_id,
                                                               request.check_only))
        return pb.ForgetImagesResponse(done=left == 0, remaining=left)

    async def ListImages(self, request: pb.ListImagesRequest,
                         context: Ctx) -> pb.ListImagesResponse:
        images = self.runner.repo.images(request.vm, request.disk)
        return pb.ListImagesResponse(images=[image_to_pb(i) for i in images])

    async def Restore(self, request: pb.RestoreRequest,
                      context: Ctx) -> pb.RestoreResponse:
        path = await guard(context, lambda: self.runner.restore(
            request.set_id, request.vm, request.disk, request.destination, request.format))
        return pb.RestoreResponse(path=str(path), bytes=path.stat().st_size)

    async def Verify(self, request: pb.VerifyRequest,
                     context: Ctx) -> pb.VerifyResponse:
        checks = await guard(context, lambda: self.runner.verify(request.set_id))
        return pb.VerifyResponse(
            ok=all(ok for _, ok, _ in checks),
            checks=[pb.ImageCheck(image=i, ok=ok, problem=p) for i, ok, p in checks],
        )


SERVICE = "blocktxn.v1.AgentService"


async def serve(runner: AgentRunner, listen: str, tls: TlsFiles | None = None
                ) -> grpc.aio.Server:
    """Start the gRPC server for *runner* on *listen* (host:port), TLS if configured."""
    bound: list[int] = []
    server = await start_server(
        lambda s: pb_grpc.add_AgentServiceServicer_to_server(AgentServicer(runner), s),
        pb.DESCRIPTOR.services_by_name["AgentService"].full_name, listen, tls,
        interceptors=[AccessInterceptor(
            SERVICE, {m: frozenset({"coordinator"}) for m in
                      pb.DESCRIPTOR.services_by_name["AgentService"].methods_by_name},
            runner.config.roles)], on_port=bound.append)
    host = listen.rpartition(":")[0]
    log.info("agent %s serving on %s:%d", runner.config.agent_id, host, bound[0])
    return server
