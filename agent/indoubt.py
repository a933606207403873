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

from .errors import AgentError
from .participant_messages import Phase
from .replicas import Replicas
from .runner import AgentRunner

log = logging.getLogger(__name__)


async def resolve_in_doubt_forever(runner: AgentRunner, in_doubt_after: float,
                                   replicas: Replicas) -> None:
    """Every few seconds: for each transaction voted on longer than *in_doubt_after*
    seconds ago, ask a replica for its decision and apply it."""
    voted_at: dict[str, float] = {}
    while True:
        await asyncio.sleep(min(5.0, in_doubt_after))
        now = time.monotonic()
        waiting = {t for t in runner.machine.open_txns()
                   if runner.machine.phase(t) in (Phase.PREPARED, Phase.VOTED_NO)}
        voted_at = {t: voted_at.get(t, now) for t in waiting}
        for txn_id, since in voted_at.items():
            if now - since >= in_doubt_after:
                await _ask(runner, txn_id, replicas)


async def _ask(runner: AgentRunner, txn_id: str, replicas: Replicas) -> None:
    try:
        reply = await replicas.stub().QueryDecision(
            cpb.QueryDecisionRequest(txn_id=txn_id), timeout=5)
    except grpc.aio.AioRpcError as err:
        log.warning("txn %s: in doubt, asking %s failed: %s", txn_id, replicas.current,
                    err.details() or err.code().name)
        replicas.failed()
        return
    try:
        if reply.decision == cpb.DECISION_COMMIT:
            log.info("txn %s: in doubt: the durable decision is COMMIT", txn_id)
            await runner.commit(txn_id)
        elif reply.decision == cpb.DECISION_ABORT:
            log.info("txn %s: in doubt: the durable decision is ABORT (%s)", txn_id,
                     reply.reason)
            await runner.abort(txn_id, reply.reason or "aborted")
    except AgentError as err:
        log.error("txn %s: applying the queried decision failed: %s", txn_id, err)
