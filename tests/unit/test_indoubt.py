"""The in-doubt resolver: what it does with each answer of a replica (or none) about a
voted transaction and about one stuck staged (planned or staged, no Cut)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from blocktxn.agent.config import STAGED_ALONE_AFTER
from blocktxn.agent.indoubt import InDoubt
from blocktxn.agent.participant import ParticipantMachine
from blocktxn.agent.participant_messages import (
    CutDone,
    CutPlanned,
    CutRequested,
    MemberPlan,
    PrepareRequested,
    Staged,
    Thawed,
    TxnPlan,
    VotedNo,
)
from blocktxn.v1 import coordinator_pb2 as cpb

IN_DOUBT_AFTER = 30.0


def plan(txn: str, disk: str) -> TxnPlan:
    m = MemberPlan("vm1", disk, "full", "first", f"blocktxn:{txn}", None, (), f"job-{disk}",
                   f"node-{disk}", f"images/{disk}", "", 1, 0)
    return TxnPlan(txn, (m,), "freeze", 5.0)


class Unreachable(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "test", None)


class FakeReplicas:
    """Answers QueryDecision from *answers*: txn -> a decision, or a gRPC status code."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}
        self.asked: list[str] = []
        self.current = "replica"

    def stub(self) -> FakeReplicas:
        return self

    async def QueryDecision(self, request: Any, timeout: float) -> Any:
        self.asked.append(request.txn_id)
        answer = self.answers.get(request.txn_id, grpc.StatusCode.UNAVAILABLE)
        if isinstance(answer, grpc.StatusCode):
            raise Unreachable(answer)
        return cpb.QueryDecisionResponse(decision=answer, reason="because")

    def failed(self) -> None:
        pass


class FakeRunner:
    """The machine, and the calls the resolver makes (recorded, applied to the machine
    only as far as the tests need)."""

    def __init__(self) -> None:
        self.machine = ParticipantMachine()
        self.calls: list[tuple[str, str]] = []

    async def commit(self, txn_id: str) -> None:
        self.calls.append(("commit", txn_id))

    async def abort(self, txn_id: str, reason: str) -> None:
        self.calls.append(("abort", txn_id))

    async def abandon(self, txn_id: str, reason: str) -> bool:
        self.calls.append(("abandon", txn_id))
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def setup() -> tuple[FakeRunner, FakeReplicas, Clock, InDoubt]:
    runner, replicas, clock = FakeRunner(), FakeReplicas(), Clock()
    resolver = InDoubt(runner, replicas, IN_DOUBT_AFTER, clock=clock)  # type: ignore[arg-type]
    return runner, replicas, clock, resolver


def stage(runner: FakeRunner, txn: str, disk: str) -> None:
    runner.machine.handle(txn, CutPlanned(plan(txn, disk)))
    runner.machine.handle(txn, Staged())


def test_the_bound_is_documented_and_long_enough() -> None:
    assert 300 <= STAGED_ALONE_AFTER <= 86400


@pytest.mark.parametrize(("answer", "expected"), [
    (cpb.DECISION_ABORT, [("abort", "s")]),
    (grpc.StatusCode.NOT_FOUND, [("abandon", "s")]),    # no replica knows it: forgotten
    (cpb.DECISION_NONE, []),                            # undecided: the coordinator drives it
    (cpb.DECISION_COMMIT, []),                          # impossible unvoted: never acted on
    (grpc.StatusCode.UNAVAILABLE, []),                  # no answer, not for long: kept
])
def test_a_stuck_staged_transaction_is_asked_about(answer: Any, expected: list[Any]) -> None:
    runner, replicas, clock, resolver = setup()
    stage(runner, "s", "d0")
    replicas.answers["s"] = answer
    asyncio.run(resolver.tick())
    assert replicas.asked == [] and runner.calls == []          # not in doubt yet
    clock.now += IN_DOUBT_AFTER
    asyncio.run(resolver.tick())
    assert replicas.asked == ["s"] and runner.calls == expected


def test_a_staged_transaction_with_no_replica_answering_is_rolled_back_after_the_bound(
) -> None:
    runner, _, clock, resolver = setup()
    stage(runner, "s", "d0")
    asyncio.run(resolver.tick())
    clock.now += STAGED_ALONE_AFTER - 1
    asyncio.run(resolver.tick())
    assert runner.calls == []
    clock.now += 1
    asyncio.run(resolver.tick())
    assert runner.calls == [("abandon", "s")]


def test_a_replica_that_answers_undecided_keeps_it_past_the_bound() -> None:
    """The coordinator holds it open (before its deadline): it will cut or abort it."""
    runner, replicas, clock, resolver = setup()
    stage(runner, "s", "d0")
    replicas.answers["s"] = cpb.DECISION_NONE
    asyncio.run(resolver.tick())
    clock.now += STAGED_ALONE_AFTER + 1
    asyncio.run(resolver.tick())
    assert runner.calls == []


def test_a_voted_transaction_is_never_rolled_back_alone() -> None:
    """Voted: only a durable decision applies; unknown or no answer keeps it, forever."""
    runner, replicas, clock, resolver = setup()
    m = runner.machine
    m.handle("v", CutPlanned(plan("v", "d1")))
    m.handle("v", Staged())
    m.handle("v", CutDone(1.0, 2.0, 6.0))
    m.handle("v", Thawed(False, 3.0))
    m.handle("v", PrepareRequested())
    m.handle("v", VotedNo("no"))
    for answer in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
        replicas.answers["v"] = answer
        asyncio.run(resolver.tick())
        clock.now += STAGED_ALONE_AFTER * 10
        asyncio.run(resolver.tick())
    assert runner.calls == []
    replicas.answers["v"] = cpb.DECISION_ABORT
    asyncio.run(resolver.tick())
    assert runner.calls == [("abort", "v")]


def test_a_cut_in_progress_is_not_a_stuck_stage() -> None:
    runner, replicas, clock, resolver = setup()
    stage(runner, "c", "d0")
    runner.machine.handle("c", CutRequested())
    replicas.answers["c"] = grpc.StatusCode.NOT_FOUND
    asyncio.run(resolver.tick())
    clock.now += STAGED_ALONE_AFTER + 1
    asyncio.run(resolver.tick())
    assert replicas.asked == [] and runner.calls == []


def test_the_bound_counts_from_the_last_answer() -> None:
    """A replica said "undecided" a moment ago: one failed query later must not roll
    the transaction back (the bound is silence for that long, not age)."""
    runner, replicas, clock, resolver = setup()
    stage(runner, "s", "d0")
    replicas.answers["s"] = cpb.DECISION_NONE
    asyncio.run(resolver.tick())            # first seen staged
    clock.now += STAGED_ALONE_AFTER
    asyncio.run(resolver.tick())            # answered: undecided
    assert replicas.asked == ["s"]
    del replicas.answers["s"]               # then no replica answers
    clock.now += IN_DOUBT_AFTER
    asyncio.run(resolver.tick())
    assert runner.calls == []
    clock.now += STAGED_ALONE_AFTER
    asyncio.run(resolver.tick())
    assert runner.calls == [("abandon", "s")]
