"""In doubt: a participant that voted and has heard nothing for a while asks the
coordinator replicas for the durable decision itself (any replica answers from etcd,
and past the deadline writes the presumed abort), so a lost Commit or Abort message
never leaves this agent's disks held."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from blocktxn.v1 import coordinator_pb2 as cpb
from blocktxn.v1 import coordinator_pb2_grpc as cpb_grpc

from .config import AgentConfig
from .errors import AgentError
from .participant_messages import Phase
from .runner import AgentRunner

log = logging.getLogger(__name__)


async def resolve_in_doubt_forever(runner: AgentRunner, config: AgentConfig) -> None:
    """Every few seconds: for each transaction voted on longer than
    ``config.in_doubt_after`` ago, ask a replica for its decision and apply it."""
    assert config.coordinator
    replicas = [a.strip() for a in config.coordinator.split(",") if a.strip()]
    channels = [config.tls.channel(a) for a in replicas]
    voted_at: dict[str, float] = {}
    turn = 0
    try:
        while True:
            await asyncio.sleep(min(5.0, config.in_doubt_after))
            now = time.monotonic()
            waiting = {t for t in runner.machine.open_txns()
                       if runner.machine.phase(t) in (Phase.PREPARED, Phase.VOTED_NO)}
            voted_at = {t: voted_at.get(t, now) for t in waiting}
            for txn_id, since in voted_at.items():
                if now - since < config.in_doubt_after:
                    continue
                stub = cpb_grpc.CoordinatorServiceStub(channels[turn % len(channels)])
                try:
                    reply = await stub.QueryDecision(
                        cpb.QueryDecisionRequest(txn_id=txn_id), timeout=5)
                except grpc.aio.AioRpcError as err:
                    log.warning("txn %s: in doubt, asking %s failed: %s", txn_id,
                                replicas[turn % len(replicas)], err.details() or err.code().name)
                    turn += 1
                    continue
                try:
                    if reply.decision == cpb.DECISION_COMMIT:
                        log.info("txn %s: in doubt: the durable decision is COMMIT", txn_id)
                        await runner.commit(txn_id)
                    elif reply.decision == cpb.DECISION_ABORT:
                        log.info("txn %s: in doubt: the durable decision is ABORT (%s)",
                                 txn_id, reply.reason)
                        await runner.abort(txn_id, reply.reason or "aborted")
                except AgentError as err:
                    log.error("txn %s: applying the queried decision failed: %s", txn_id, err)
    finally:
        for channel in channels:
            await channel.close(None)
