"""The coordinator's pure 2PC machine under every interleaving (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from blocktxn.coordinator.txn_machine import (
    Acked,
    Begin,
    CancelRequested,
    CutReplied,
    DeadlinePassed,
    Decision,
    DecisionDurable,
    Finish,
    Persisted,
    PersistRunning,
    Resumed,
    SendAbort,
    SendCommit,
    SendCut,
    SendPrepare,
    SendThaw,
    ThawReplied,
    TxnCommand,
    TxnEvent,
    TxnMachine,
    TxnPhase,
    VoteReplied,
    WriteDecision,
)

AGENTS = ("a", "b", "c")


def test_happy_path_exact_commands() -> None:
    m = TxnMachine("t", AGENTS)
    assert m.handle(Begin()) == [SendCut(a) for a in AGENTS]
    assert m.handle(CutReplied("a", True)) == []
    m.handle(CutReplied("b", True))
    assert m.handle(CutReplied("c", True)) == [SendThaw(a) for a in AGENTS]
    for a in AGENTS[:-1]:
        assert m.handle(ThawReplied(a, True)) == []
    assert m.handle(ThawReplied("c", True)) == [PersistRunning()]
    assert m.handle(Persisted()) == [SendPrepare(a) for a in AGENTS]
    m.handle(VoteReplied("a", True))
    m.handle(VoteReplied("b", True))
    assert m.handle(VoteReplied("c", True)) == [WriteDecision(Decision.COMMIT, "", AGENTS)]
    assert m.handle(VoteReplied("c", True)) == []      # nothing while the write is in flight
    assert m.handle(DecisionDurable(Decision.COMMIT, "", AGENTS)) == [SendCommit(a)
                                                                     for a in AGENTS]
    m.handle(Acked("a"))
    m.handle(Acked("b"))
    assert m.handle(Acked("c")) == [Finish()]
    assert m.phase == TxnPhase.DONE


def test_no_vote_aborts_at_once_in_grouped_mode() -> None:
    m = TxnMachine("t", AGENTS)
    for e in [Begin(), *[CutReplied(a, True) for a in AGENTS],
              *[ThawReplied(a, True) for a in AGENTS], Persisted()]:
        m.handle(e)
    assert m.handle(VoteReplied("b", False, "EIO")) == [
        WriteDecision(Decision.ABORT, "b voted NO: EIO", ())]


def test_individual_mode_commits_the_yes_voters() -> None:
    m = TxnMachine("t", AGENTS, grouped=False)
    for e in [Begin(), *[CutReplied(a, True) for a in AGENTS],
              *[ThawReplied(a, True) for a in AGENTS], Persisted(),
              VoteReplied("a", True), VoteReplied("b", False, "x")]:
        m.handle(e)
    assert m.handle(VoteReplied("c", True)) == [WriteDecision(Decision.COMMIT, "b: x",
                                                              ("a", "c"))]
    assert m.handle(DecisionDurable(Decision.COMMIT, "b: x", ("a", "c"))) == [
        SendCommit("a"), SendAbort("b", "b: x"), SendCommit("c")]


def test_thawed_on_own_or_failed_cut_aborts() -> None:
    m = TxnMachine("t", AGENTS)
    m.handle(Begin())
    out = m.handle(CutReplied("a", False, "no guest agent"))
    assert out == [WriteDecision(Decision.ABORT, "cut failed on a: no guest agent", ())]


def test_new_leader_aborts_a_cut_and_requeries_a_running_transaction() -> None:
    m = TxnMachine("t", AGENTS)
    assert m.handle(Resumed()) == [WriteDecision(
        Decision.ABORT, "coordinator leader changed during the cut", ())]
    r = TxnMachine("t", AGENTS, phase=TxnPhase.RUNNING)
    assert r.handle(Resumed()) == [SendPrepare(a) for a in AGENTS]
    d = TxnMachine.recovered("t", AGENTS, True, True, Decision.ABORT, "x")
    assert d.handle(Resumed()) == [SendAbort(a, "x") for a in AGENTS]
    c = TxnMachine.recovered("t", AGENTS, True, True, Decision.COMMIT, "", AGENTS)
    c.validate()
    assert c.handle(Resumed()) == [SendCommit(a) for a in AGENTS]
    c.validate()


EVENTS = st.one_of(
    st.builds(CutReplied, st.sampled_from(AGENTS), st.booleans()),
    st.builds(ThawReplied, st.sampled_from(AGENTS), st.booleans()),
    st.just(Persisted()),
    st.builds(VoteReplied, st.sampled_from(AGENTS), st.booleans()),
    st.builds(Acked, st.sampled_from(AGENTS)),
    st.builds(CancelRequested, st.just("c")),
    st.just(DeadlinePassed()),
    st.just(Resumed()),
)


@settings(max_examples=500, deadline=None)
@given(st.booleans(), st.lists(EVENTS, max_size=40))
def test_any_interleaving_keeps_single_decision_and_atomicity(
    grouped: bool, events: list[TxnEvent]
) -> None:
    """The runner's durable write answers WriteDecision; a leader change replays the
    durable decision. Whatever arrives in whatever order: one decision, never changed;
    grouped COMMIT only with every YES; commit only sent to YES voters."""
    m = TxnMachine("t", AGENTS, grouped=grouped)
    durable: DecisionDurable | None = None
    pending: list[TxnCommand] = list(m.handle(Begin()))
    for event in events:
        out = list(m.handle(event))
        pending += out
        for cmd in [c for c in pending if isinstance(c, WriteDecision)]:
            pending.remove(cmd)
            if durable is None:  # create-if-absent: the first write wins
                durable = DecisionDurable(cmd.decision, cmd.reason, cmd.committed)
            pending += m.handle(durable)
        m.validate()
        if m.decision is not None:
            assert durable is not None and m.decision == durable.decision
        for sent in pending:
            if isinstance(sent, SendCommit):
                assert m.decision == Decision.COMMIT and m.parts[sent.agent_id].vote
                if grouped:
                    assert all(p.vote for p in m.parts.values())
