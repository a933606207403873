"""The coordinator's pure 2PC machine under every interleaving (hypothesis), and
recovery as replay of the durable records through the same machine."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktxn.coordinator.errors import TxnStateError
from blocktxn.coordinator.records import DecisionRecord, MemberRecord, TxnRecord
from blocktxn.coordinator.recovery import history, rebuild
from blocktxn.coordinator.txn_machine import Step, TxnMachine
from blocktxn.coordinator.txn_messages import (
    Acked,
    Begin,
    CancelRequested,
    CutReplied,
    DeadlinePassed,
    Decision,
    DecisionDurable,
    Finish,
    MarkedRunning,
    Persisted,
    PersistRunning,
    RecordLoaded,
    Resumed,
    SendAbort,
    SendCommit,
    SendCut,
    SendPrepare,
    SendStage,
    SendThaw,
    StageReplied,
    ThawReplied,
    TxnCommand,
    TxnEvent,
    TxnPhase,
    VoteReplied,
    WriteDecision,
)

AGENTS = ("a", "b", "c")


STAGED = [Begin(), *[StageReplied(a, True) for a in AGENTS]]


def record(phase: TxnPhase = TxnPhase.CUTTING, grouped: bool = True,
           quiesce: str = "none") -> TxnRecord:
    """A durable transaction record over AGENTS, as a new leader reads it."""
    return TxnRecord("t", "r", "grouped" if grouped else "individual", quiesce, 10.0, 0.0, 0,
                     0.0, members=tuple(MemberRecord(a, "vm", "d0", "auto") for a in AGENTS),
                     agents=tuple((a, f"{a}:1") for a in AGENTS), phase=phase)


def running(grouped: bool = True) -> TxnMachine:
    """A machine whose every agent cut and thawed, with Prepare sent to all."""
    m = TxnMachine("t", AGENTS, grouped=grouped)
    for e in [*STAGED, *[CutReplied(a, True) for a in AGENTS],
              *[ThawReplied(a, True) for a in AGENTS], Persisted()]:
        m.handle(e)
    return m


def test_happy_path_exact_commands() -> None:
    m = TxnMachine("t", AGENTS)
    assert m.handle(Begin()) == [SendStage(a) for a in AGENTS]
    assert m.handle(StageReplied("a", True)) == [] and m.handle(StageReplied("b", True)) == []
    assert m.handle(StageReplied("c", True)) == [SendCut(a) for a in AGENTS]
    assert m.handle(StageReplied("c", True)) == []         # a repeated reply: harmless
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


def test_without_quiesce_there_is_no_stage_and_no_thaw_round() -> None:
    m = TxnMachine("t", AGENTS, quiesce="none")
    assert m.handle(Begin()) == [SendCut(a) for a in AGENTS]
    m.handle(CutReplied("a", True))
    m.handle(CutReplied("b", True))
    assert m.handle(CutReplied("c", True)) == [PersistRunning()]
    assert m.handle(Persisted()) == [SendPrepare(a) for a in AGENTS]
    m.validate()
    with pytest.raises(TxnStateError):
        m.handle(ThawReplied("a", True))                   # no thaw was sent


def test_a_failed_stage_aborts_before_anything_is_frozen() -> None:
    m = TxnMachine("t", AGENTS)
    m.handle(Begin())
    m.handle(StageReplied("a", True))
    assert m.handle(StageReplied("b", False, "no space")) == [
        WriteDecision(Decision.ABORT, "cut failed on b: no space", ())]
    assert m.handle(StageReplied("c", True)) == []         # late: no cut is sent
    assert Step.CUT not in m.asked


def test_no_vote_aborts_at_once_in_grouped_mode() -> None:
    m = running()
    assert m.handle(VoteReplied("b", False, "EIO")) == [
        WriteDecision(Decision.ABORT, "b voted NO: EIO", ())]


def test_individual_mode_commits_the_yes_voters() -> None:
    m = running(grouped=False)
    for e in [VoteReplied("a", True), VoteReplied("b", False, "x")]:
        m.handle(e)
    assert m.handle(VoteReplied("c", True)) == [WriteDecision(Decision.COMMIT, "b: x",
                                                              ("a", "c"))]
    assert m.handle(DecisionDurable(Decision.COMMIT, "b: x", ("a", "c"))) == [
        SendCommit("a"), SendAbort("b", "b: x"), SendCommit("c")]


def test_thawed_on_own_or_failed_cut_aborts() -> None:
    m = TxnMachine("t", AGENTS)
    for e in STAGED:
        m.handle(e)
    out = m.handle(CutReplied("a", False, "no guest agent"))
    assert out == [WriteDecision(Decision.ABORT, "cut failed on a: no guest agent", ())]
    t = TxnMachine("t", AGENTS)
    for e in [*STAGED, *[CutReplied(a, True) for a in AGENTS]]:
        t.handle(e)
    assert t.handle(ThawReplied("b", True, on_own=True)) == [WriteDecision(
        Decision.ABORT, "thaw on b: thawed on its own: freeze deadline passed", ())]


def test_new_leader_aborts_a_cut_and_requeries_a_running_transaction() -> None:
    m = rebuild(record(), None)
    assert m.handle(Resumed()) == [WriteDecision(
        Decision.ABORT, "cut abandoned (leader changed or start reply lost)", ())]
    r = rebuild(record(TxnPhase.RUNNING), None)
    assert r.handle(Resumed()) == [SendPrepare(a) for a in AGENTS]
    d = rebuild(record(TxnPhase.RUNNING), DecisionRecord("t", Decision.ABORT, "x"))
    assert d.handle(Resumed()) == [SendAbort(a, "x") for a in AGENTS]
    c = rebuild(record(TxnPhase.RUNNING), DecisionRecord("t", Decision.COMMIT, "", AGENTS))
    c.validate()
    assert c.handle(Resumed()) == [SendCommit(a) for a in AGENTS]
    c.validate()


def test_recovery_is_replay_of_the_durable_records() -> None:
    decision = DecisionRecord("t", Decision.COMMIT, "b: x", ("a", "c"))
    assert history(record(TxnPhase.RUNNING, grouped=False), decision) == [
        RecordLoaded(), MarkedRunning(), DecisionDurable(Decision.COMMIT, "b: x", ("a", "c"))]
    i = rebuild(record(TxnPhase.RUNNING, grouped=False), decision)
    assert (i.phase, i.recovering) == (TxnPhase.DECIDED, True)
    assert i.handle(Resumed()) == [SendCommit("a"), SendAbort("b", "b: x"), SendCommit("c")]
    with pytest.raises(TxnStateError):  # a grouped COMMIT must name every agent
        rebuild(record(TxnPhase.RUNNING), decision)


def test_late_replies_are_accepted_and_change_nothing() -> None:
    m = TxnMachine("t", AGENTS)
    for e in STAGED:
        m.handle(e)
    m.handle(CutReplied("a", False, "x"))
    assert m.handle(CutReplied("b", True)) == []                  # while deciding
    assert m.handle(CancelRequested("c")) == [] and m.handle(DeadlinePassed()) == []
    assert m.handle(DecisionDurable(Decision.ABORT, "cut failed on a: x", ())) == [
        SendAbort(a, "cut failed on a: x") for a in AGENTS]
    assert m.handle(CutReplied("c", True)) == []                  # after the decision
    assert m.handle(Acked("a")) == [] and m.handle(Acked("a")) == []    # acked twice
    assert m.handle(DeadlinePassed()) == [] and m.handle(CancelRequested("c")) == []
    m.handle(Acked("b"))
    assert m.handle(Acked("c")) == [Finish()]
    assert m.handle(CancelRequested("late")) == [] and m.handle(Acked("c")) == []
    m.validate()


@pytest.mark.parametrize("events,wrong", [
    ([], VoteReplied("a", True)),                                 # no Prepare was sent
    ([], ThawReplied("a", True)),                                 # no Thaw was sent
    ([], Persisted()),                                            # no marker was written
    ([], Acked("a")),                                             # nothing was decided
    ([], DecisionDurable(Decision.ABORT, "", ())),                # no decision write
    ([], Begin()),                                                # begun twice
    ([], Resumed()),                                              # not replaying
    ([], MarkedRunning()),
    ([], CutReplied("z", True)),                                  # not a member
    ([], CutReplied("a", True)),                                  # no cut was sent yet
    ([StageReplied("a", True)], StageReplied("a", False)),        # contradicts its reply
    ([*STAGED[1:], CutReplied("a", True)], CutReplied("a", False)),
])
def test_impossible_events_are_refused_and_change_nothing(events: list[TxnEvent],
                                                          wrong: TxnEvent) -> None:
    m = TxnMachine("t", AGENTS)
    for e in [Begin(), *events]:
        m.handle(e)
    before = copy.deepcopy(m)
    with pytest.raises(TxnStateError):
        m.handle(wrong)
    assert m == before
    fresh = TxnMachine("t", AGENTS)
    with pytest.raises(TxnStateError):
        fresh.handle(CancelRequested("before the start"))
    loaded = TxnMachine("t", AGENTS)
    loaded.handle(RecordLoaded())
    with pytest.raises(TxnStateError):
        loaded.handle(CutReplied("a", True))                      # still replaying


class World:
    """One machine, the commands it has in flight and what etcd holds. Replies come
    in any order, each command answered at most once; a crash loses the in-flight
    commands and replaces the machine by the replay of the durable records."""

    def __init__(self, grouped: bool, quiesce: str) -> None:
        self.grouped, self.quiesce = grouped, quiesce
        self.marked_running = False
        self.durable: DecisionDurable | None = None
        self.machine = TxnMachine("t", AGENTS, grouped=grouped, quiesce=quiesce)
        self.pending: list[TxnCommand] = []
        self.sent: list[TxnCommand] = []
        self.finished = False
        self.feed(Begin())

    def feed(self, event: TxnEvent) -> list[TxnCommand]:
        m = self.machine
        out = m.handle(event)
        m.validate()
        for cmd in out:
            if isinstance(cmd, SendCommit):
                assert m.decision == Decision.COMMIT and m.parts[cmd.agent_id].vote
                if self.grouped:
                    assert all(p.vote for p in m.parts.values())
        self.pending += [c for c in out if not isinstance(c, Finish)]
        self.sent += [c for c in out if isinstance(c, (SendCommit, SendAbort))]
        self.finished = self.finished or Finish() in out
        if m.decision is not None:
            assert self.durable is not None and m.decision == self.durable.decision
        return out

    def write_decision(self, cmd: WriteDecision) -> DecisionDurable:
        if self.durable is None:  # create-if-absent: the first write wins
            self.durable = DecisionDurable(cmd.decision, cmd.reason, cmd.committed)
        return self.durable

    def answer(self, cmd: TxnCommand, ok: bool, pick: int) -> TxnEvent:
        if isinstance(cmd, SendStage):
            return StageReplied(cmd.agent_id, ok, "" if ok else "ENOSPC")
        if isinstance(cmd, SendCut):
            return CutReplied(cmd.agent_id, ok, "" if ok else "boom")
        if isinstance(cmd, SendThaw):
            return ThawReplied(cmd.agent_id, ok, "" if ok else "boom", on_own=pick % 4 == 0)
        if isinstance(cmd, PersistRunning):
            self.marked_running = True
            return Persisted()
        if isinstance(cmd, SendPrepare):
            return VoteReplied(cmd.agent_id, ok, "" if ok else "EIO")
        if isinstance(cmd, WriteDecision):
            return self.write_decision(cmd)
        assert isinstance(cmd, (SendCommit, SendAbort))
        return Acked(cmd.agent_id)

    def step(self, kind: str, pick: int, ok: bool) -> None:
        if kind == "reply" and self.pending:
            cmd = self.pending.pop(pick % len(self.pending))
            self.feed(self.answer(cmd, ok, pick))
        elif kind == "cancel":
            self.feed(CancelRequested("c"))
        elif kind == "deadline":
            self.feed(DeadlinePassed())
        elif kind == "presume":  # another replica presumes abort, then this one hears of it
            if self.durable is None:
                self.durable = DecisionDurable(Decision.ABORT, "presumed abort", ())
            self.feed(DeadlinePassed())
        elif kind == "crash":  # a durable write in flight may or may not have landed
            for cmd in self.pending:
                if ok and isinstance(cmd, PersistRunning):
                    self.marked_running = True
                if ok and isinstance(cmd, WriteDecision):
                    self.write_decision(cmd)
            d = self.durable
            self.machine = rebuild(
                record(TxnPhase.RUNNING if self.marked_running else TxnPhase.CUTTING,
                       self.grouped, self.quiesce),
                None if d is None else DecisionRecord("t", d.decision, d.reason, d.committed))
            self.pending = []
            out = self.feed(Resumed())
            if d is None and not self.marked_running:
                assert out == [WriteDecision(
                    Decision.ABORT, "cut abandoned (leader changed or start reply lost)", ())]

    def drain(self) -> None:
        """Answer everything in flight with success: the transaction must finish."""
        for _ in range(100):
            if self.finished or not self.pending:
                break
            self.feed(self.answer(self.pending.pop(0), True, 1))
        assert self.finished and self.machine.phase == TxnPhase.DONE


ACTIONS = st.lists(st.tuples(
    st.sampled_from(("reply", "reply", "reply", "reply", "cancel", "deadline", "presume",
                     "crash")),
    st.integers(0, 99), st.booleans()), max_size=60)


@settings(max_examples=500, deadline=None)
@given(st.booleans(), st.sampled_from(("freeze", "none")), ACTIONS)
def test_any_interleaving_keeps_single_decision_and_atomicity(
    grouped: bool, quiesce: str, actions: list[tuple[str, int, bool]]
) -> None:
    """Replies in any order, cancels, deadlines, a presumed abort by another replica,
    leader crashes replayed from etcd: every event is accepted, one decision, never
    changed; grouped COMMIT only with every YES; commit only sent to YES voters; every
    agent hears the durable decision only; and the transaction always finishes."""
    world = World(grouped, quiesce)
    for kind, pick, ok in actions:
        if world.finished:
            break
        world.step(kind, pick, ok)
    world.drain()
    durable = world.durable
    assert durable is not None
    for sent in world.sent:
        if isinstance(sent, SendCommit):
            assert durable.decision == Decision.COMMIT and sent.agent_id in durable.committed
        elif grouped:
            assert durable.decision == Decision.ABORT


EVENTS = st.one_of(
    st.builds(StageReplied, st.sampled_from(AGENTS), st.booleans()),
    st.builds(CutReplied, st.sampled_from(AGENTS), st.booleans()),
    st.builds(ThawReplied, st.sampled_from(AGENTS), st.booleans()),
    st.just(Persisted()),
    st.builds(VoteReplied, st.sampled_from(AGENTS), st.booleans()),
    st.builds(DecisionDurable, st.sampled_from(Decision), st.just(""),
              st.sampled_from(((), AGENTS, ("a",)))),
    st.builds(Acked, st.sampled_from(AGENTS)),
    st.builds(CancelRequested, st.just("c")),
    st.just(DeadlinePassed()),
    st.just(Resumed()),
)


@settings(max_examples=500, deadline=None)
@given(st.booleans(), st.sampled_from(("freeze", "none")), st.lists(EVENTS, max_size=40))
def test_any_event_is_accepted_or_refused_without_harm(
    grouped: bool, quiesce: str, events: list[TxnEvent]
) -> None:
    """Even impossible events (duplicates, replies never asked for) never corrupt the
    machine: it either accepts them or raises TxnStateError and stays as it was."""
    m = TxnMachine("t", AGENTS, grouped=grouped, quiesce=quiesce)
    m.handle(Begin())
    for event in events:
        before = copy.deepcopy(m)
        try:
            m.handle(event)
        except TxnStateError:
            assert m == before
        m.validate()
