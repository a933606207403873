"""In doubt: a participant that voted and has heard nothing for a while asks the
coordinator replicas for the durable decision itself (any replica answers from etcd,
and past the deadline writes the presumed abort), so a lost Commit or Abort message
never leaves this agent's disks held.

The same for a transaction stuck staged (planned or staged, no Cut: its targets made,
its disks held): asked about after the same while, it is rolled back when a replica
says it is aborted or that no replica knows it (its record is gone: it can only have
been aborted, or never begun), and kept while one says it is undecided. If no replica
answers, it is rolled back on this agent's own account after STAGED_ALONE_AFTER. That
is safe against every invariant of DESIGN.md: it never voted and cannot vote YES
without a Cut first, so no decision can be COMMIT (atomicity, single decision: a later
Cut is refused and a later Prepare answered NO, which aborts it everywhere); its
rollback removes only its own targets and images (no checkpoint was added before the
Cut, the previous one kept recording: no lost change); nothing was frozen (bounded
freeze). The bound only keeps a coordinator that is merely slow or changing leaders
from losing a transaction it would still cut. A voted transaction is never rolled back
without a durable decision."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from blocktxn.v1 import coordinator_pb2 as cpb

from .config import STAGED_ALONE_AFTER
from .errors import AgentError
from .participant_messages import Phase
from .replicas import Replicas
from .runner import AgentRunner

log = logging.getLogger(__name__)

# STAGED_ALONE_AFTER (``--staged-alone-after``'s default): seconds a transaction may
# stay staged on this agent (a Stage came, no Cut) while no coordinator replica
# answers about it, before the agent rolls it back on its own.
# It must exceed, with a wide margin, the longest legitimate wait between one agent's
# Stage and its Cut: the coordinator cuts once every agent has answered its Stage (each
# Stage RPC within the coordinator's agent-call timeout, retried for 5 s; a stage may
# wait up to 30 s for a removal on its disks) and a new leader aborts, not cuts, a
# transaction that was cutting, so the wait is well under a minute, plus a leader
# change (seconds). Sensible range 300..86400 s: shorter risks rolling back a cut a
# slow coordinator would still make (it then aborts: liveness, never safety); longer
# keeps the disks of a forgotten transaction from any backup for that long.
# (The value lives in config.py, beside the option's other defaults.)

UNKNOWN = -1  # an answer: no replica knows the transaction (NOT_FOUND)


async def resolve_in_doubt_forever(runner: AgentRunner, in_doubt_after: float,
                                   replicas: Replicas,
                                   staged_alone_after: float = STAGED_ALONE_AFTER) -> None:
    """Every few seconds: for each transaction voted on (or staged and not cut) longer
    than *in_doubt_after* seconds ago, ask a replica for its decision and apply it."""
    resolver = InDoubt(runner, replicas, in_doubt_after, staged_alone_after)
    while True:
        await asyncio.sleep(min(5.0, in_doubt_after))
        await resolver.tick()


class InDoubt:
    """The resolver's memory: since when each voted or staged transaction waits."""

    def __init__(self, runner: AgentRunner, replicas: Replicas, in_doubt_after: float,
                 staged_alone_after: float = STAGED_ALONE_AFTER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runner = runner
        self.replicas = replicas
        self.in_doubt_after = in_doubt_after
        self.staged_alone_after = staged_alone_after
        self.clock = clock
        self.voted_at: dict[str, float] = {}
        # since when each staged one waits, or since a replica last said it is undecided
        # (a restart rolls staged ones back: in memory)
        self.staged_at: dict[str, float] = {}

    async def tick(self) -> None:
        now = self.clock()
        machine = self.runner.machine
        open_txns = machine.open_txns()
        voted = {t for t in open_txns if machine.phase(t) in (Phase.PREPARED, Phase.VOTED_NO)}
        staged = {t for t in open_txns if machine.may_abort_alone(t)}
        self.voted_at = {t: self.voted_at.get(t, now) for t in voted}
        self.staged_at = {t: self.staged_at.get(t, now) for t in staged}
        for txn_id, since in self.voted_at.items():
            if now - since >= self.in_doubt_after:
                await self._voted(txn_id)
        for txn_id, since in self.staged_at.items():
            if now - since >= self.in_doubt_after:
                await self._staged(txn_id, now - since)

    async def _ask(self, txn_id: str) -> tuple[int | None, str]:
        """(a cpb.DECISION_* value or UNKNOWN, its reason); (None, why) if no replica
        answered."""
        try:
            reply = await self.replicas.stub().QueryDecision(
                cpb.QueryDecisionRequest(txn_id=txn_id), timeout=5)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return UNKNOWN, err.details() or "unknown transaction"
            why = err.details() or err.code().name
            log.warning("txn %s: in doubt, asking %s failed: %s", txn_id, self.replicas.current,
                        why)
            self.replicas.failed()
            return None, why
        return int(reply.decision), reply.reason

    async def _voted(self, txn_id: str) -> None:
        decision, reason = await self._ask(txn_id)
        try:
            if decision == cpb.DECISION_COMMIT:
                log.info("txn %s: in doubt: the durable decision is COMMIT", txn_id)
                await self.runner.commit(txn_id)
            elif decision == cpb.DECISION_ABORT:
                log.info("txn %s: in doubt: the durable decision is ABORT (%s)", txn_id, reason)
                await self.runner.abort(txn_id, reason or "aborted")
            elif decision == UNKNOWN:  # voted: never undone without a durable decision
                log.warning("txn %s: in doubt: the replica does not know it (%s); kept",
                            txn_id, reason)
        except AgentError as err:
            log.error("txn %s: applying the queried decision failed: %s", txn_id, err)

    async def _staged(self, txn_id: str, waited: float) -> None:
        decision, reason = await self._ask(txn_id)
        try:
            if decision == cpb.DECISION_ABORT:
                log.info("txn %s: staged, never cut: the durable decision is ABORT (%s)",
                         txn_id, reason)
                await self.runner.abort(txn_id, reason or "aborted")
            elif decision == UNKNOWN:
                log.warning("txn %s: staged, never cut, and the coordinator does not know "
                            "it (%s): rolled back", txn_id, reason)
                await self.runner.abandon(
                    txn_id, "staged, never cut, and the coordinator does not know it")
            elif decision == cpb.DECISION_COMMIT:  # cannot be: this agent never voted
                log.error("txn %s: staged, never cut, yet a replica says COMMIT; kept",
                          txn_id)
            elif decision is not None:  # undecided: the coordinator holds it open
                self.staged_at[txn_id] = self.clock()  # the bound counts from here
            elif waited >= self.staged_alone_after:
                log.warning("txn %s: staged, never cut, and no coordinator replica answered "
                            "for %.0f s: rolled back on our own", txn_id, waited)
                await self.runner.abandon(
                    txn_id, f"staged, never cut, and no coordinator replica answered for "
                    f"{waited:.0f} s")
        except AgentError as err:
            log.error("txn %s: rolling back the staged transaction failed: %s", txn_id, err)
