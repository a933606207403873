"""The agent's pure participant machine: exact commands per event, replay, guards."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktxn.agent.journal import event_from_record, event_to_record
from blocktxn.agent.participant import ParticipantMachine
from blocktxn.agent.participant_messages import (
    Aborted,
    AbortRequested,
    ArmAutoThaw,
    CommitRequested,
    Committed,
    CutDone,
    CutFailed,
    CutPlanned,
    CutRequested,
    DeadlinePassed,
    DeclineVote,
    Event,
    FinalizeJobs,
    Freezing,
    ImageRecord,
    MemberFailed,
    MemberPlan,
    Phase,
    Prepared,
    PrepareRequested,
    Publish,
    Recovered,
    Rollback,
    StageCut,
    Staged,
    StartCut,
    StateError,
    Thawed,
    ThawGuests,
    ThawRequested,
    TxnPlan,
    VotedNo,
)


def member(disk: str, vm: str = "vm1") -> MemberPlan:
    return MemberPlan(vm, disk, "incremental", "usable", "blocktxn:t", "blocktxn:s",
                      ("blocktxn:s",), f"job-{disk}", f"node-{disk}", f"images/{disk}", "", 1, 0)


def plan(txn: str = "t", quiesce: str = "freeze", disks: tuple[str, ...] = ("d0", "d1")
         ) -> TxnPlan:
    return TxnPlan(txn, tuple(member(d) for d in disks), quiesce, 5.0)


def images(p: TxnPlan) -> tuple[ImageRecord, ...]:
    return tuple(ImageRecord(m.vm, m.disk, p.txn_id, m.image, "", m.mode, 10, 1, 1.0,
                             m.new_bitmap) for m in p.members)


def run(m: ParticipantMachine, txn: str, *events: Event) -> list[object]:
    out: list[object] = []
    for e in events:
        out = list(m.handle(txn, e))
        m.validate_state()
    return out


def test_happy_path_exact_commands() -> None:
    m, p = ParticipantMachine(), plan()
    assert m.handle("t", CutPlanned(p)) == [StageCut("t", p)]
    assert m.busy_disks() == {("vm1", "d0"): "t", ("vm1", "d1"): "t"}
    assert m.quiesce_holders() == {"vm1": "t"}              # staged: no other freeze
    assert m.handle("t", Staged()) == []                    # a stage-only Cut ends here
    assert m.handle("t", CutRequested()) == [StartCut("t", p)]
    assert m.handle("t", CutRequested()) == []              # a retried Cut: no second start
    assert m.handle("t", CutDone(1.0, 2.0, 6.0)) == [ArmAutoThaw("t", 6.0)]
    assert m.handle("t", CutRequested()) == []              # ... nor after the cut
    assert m.phase("t") == Phase.FROZEN
    assert m.handle("t", ThawRequested(5.9)) == [ThawGuests("t", ("vm1",), "freeze",
                                                           on_own=False)]
    assert m.handle("t", Thawed(False, 3.0)) == []
    assert m.handle("t", PrepareRequested(30.0)) == [FinalizeJobs("t", p.members, 30.0)]
    assert m.handle("t", Prepared(images(p))) == []
    assert m.phase("t") == Phase.PREPARED
    assert m.handle("t", PrepareRequested()) == []          # a retried prepare re-votes YES
    assert m.handle("t", CommitRequested()) == [Publish("t", p.members, images(p))]
    assert m.handle("t", Committed(images(p))) == []
    assert m.handle("t", CommitRequested()) == []           # idempotent
    assert m.phase("t") == Phase.COMMITTED and m.busy_disks() == {}
    with pytest.raises(StateError):
        m.handle("t", AbortRequested("late"))               # single decision


def test_a_cut_asked_while_staging_starts_once_staged() -> None:
    m, p = ParticipantMachine(), plan()
    m.handle("t", CutPlanned(p))
    assert m.handle("t", CutRequested()) == []
    assert m.handle("t", Staged()) == [StartCut("t", p)]


def test_a_member_lost_after_the_stage_freezes_nothing() -> None:
    m, p = ParticipantMachine(), plan()
    run(m, "t", CutPlanned(p), Staged(), MemberFailed("vm1", "", "QMP connection lost"))
    (cmd,) = m.handle("t", CutRequested())
    assert isinstance(cmd, Rollback) and "QMP connection lost" in cmd.reason


def test_a_staged_cut_is_rolled_back_on_abort_and_after_a_restart() -> None:
    for event in (AbortRequested("x"), Recovered()):
        m, p = ParticipantMachine(), plan()
        run(m, "t", CutPlanned(p), Staged())
        (cmd,) = m.handle("t", event)
        assert isinstance(cmd, Rollback) and cmd.members == p.members
        assert cmd.thaw_vms == ("vm1",)  # releases what the stage prepared for the freeze


def test_a_restart_before_any_freeze_thaws_nothing_it_did_not_freeze() -> None:
    """Staged (or even asked to cut) but no freeze begun: the restarted agent rolls the
    cut back without taking over the guests' freeze state (a freeze held by someone
    else, e.g. an operator's fsfreeze, must stay)."""
    for events in ((CutPlanned(plan()),), (CutPlanned(plan()), Staged()),
                   (CutPlanned(plan()), CutRequested())):
        m = ParticipantMachine()
        run(m, "t", *events)
        (cmd,) = m.handle("t", Recovered())
        assert isinstance(cmd, Rollback) and cmd.members == plan().members
        assert not cmd.after_restart, events


def test_a_restart_once_the_freeze_began_thaws_after_restart() -> None:
    """Freezing journaled (just before the first freeze): the guests may be frozen by
    this cut, so recovery thaws them whoever holds them; replayed from the journal."""
    p = plan()
    live = ParticipantMachine()
    history: list[Event] = [CutPlanned(p), Staged(), CutRequested(), Freezing()]
    journal = [event_to_record("t", e) for e in history if e.journaled]
    run(live, "t", *history)
    replayed = ParticipantMachine()
    for record in json.loads(json.dumps(journal)):
        replayed.handle(*event_from_record(record))
    for m in (live, replayed):
        (cmd,) = m.handle("t", Recovered())
        assert cmd == Rollback("t", p.members, ("vm1",), "freeze",
                               "agent restarted during the cut", after_restart=True)


def test_freezing_is_journaled_without_fsync_and_only_while_cutting() -> None:
    assert Freezing.journaled and not Freezing.fsync
    assert all(type(e).fsync for e in JOURNALED if not isinstance(e, Freezing))
    m, p = ParticipantMachine(), plan()
    run(m, "t", CutPlanned(p), Staged(), CutRequested(), Freezing(), CutDone(1.0, 2.0, 6.0))
    with pytest.raises(StateError):
        m.handle("t", Freezing())


def test_only_a_cut_never_asked_to_freeze_may_be_rolled_back_alone() -> None:
    """Planned or staged, with no Cut asked yet: this agent never voted and cannot vote
    YES without a Cut first, so no coordinator can commit it: it may roll it back on
    its own (indoubt.py). Not once the Cut runs, nor after it."""
    m, p = ParticipantMachine(), plan()
    assert not m.may_abort_alone("t")                       # unknown
    m.handle("t", CutPlanned(p))
    assert m.may_abort_alone("t")
    m.handle("t", Staged())
    assert m.may_abort_alone("t")
    m.handle("t", CutRequested())                           # the freeze and start run
    assert not m.may_abort_alone("t")
    for events in ((CutDone(1.0, 2.0, 6.0),), (Thawed(False, 3.0),),
                   (PrepareRequested(), Prepared(images(p)))):
        run(m, "t", *events)
        assert not m.may_abort_alone("t")
    # rolled back alone: a late Cut is answered from the state (refused), no YES vote
    m2 = ParticipantMachine()
    run(m2, "t", CutPlanned(p), Staged())
    (cmd,) = m2.handle("t", AbortRequested("no coordinator answered"))
    assert cmd == Rollback("t", p.members, ("vm1",), "freeze", "no coordinator answered")
    m2.handle("t", Aborted(cmd.reason))
    assert m2.handle("t", CutRequested()) == []             # the runner then refuses the Cut
    assert m2.handle("t", PrepareRequested()) == [] and m2.phase("t") == Phase.ABORTED
    assert not m2.may_abort_alone("t")


def test_no_quiesce_goes_straight_to_running() -> None:
    m, p = ParticipantMachine(), plan(quiesce="none")
    run(m, "t", CutPlanned(p), CutDone(0.0, 2.0, 7.0))
    assert m.phase("t") == Phase.RUNNING


def test_a_thaw_arriving_past_the_deadline_counts_as_thawed_on_own() -> None:
    m, p = ParticipantMachine(), plan()
    run(m, "t", CutPlanned(p), CutDone(1.0, 2.0, 6.0))
    assert m.handle("t", ThawRequested(6.0)) == [ThawGuests("t", ("vm1",), "freeze",
                                                           on_own=True)]


def test_deadline_thaws_and_forces_no() -> None:
    m, p = ParticipantMachine(), plan()
    run(m, "t", CutPlanned(p), CutDone(1.0, 2.0, 6.0))
    assert m.handle("t", DeadlinePassed()) == [ThawGuests("t", ("vm1",), "freeze", on_own=True)]
    m.handle("t", Thawed(True, 6.0))
    assert m.txns["t"].thawed_on_own
    out = m.handle("t", PrepareRequested())
    assert len(out) == 1 and isinstance(out[0], DeclineVote) and "deadline" in out[0].reason
    m.handle("t", VotedNo(out[0].reason))
    with pytest.raises(StateError):
        m.handle("t", CommitRequested())


def test_member_failure_votes_no_and_abort_rolls_back_everything() -> None:
    m, p = ParticipantMachine(), plan(quiesce="none")
    run(m, "t", CutPlanned(p), CutDone(0.0, 2.0, 7.0), MemberFailed("vm1", "d1", "EIO"))
    assert m.handle("t", PrepareRequested()) == [DeclineVote("t", "vm1/d1: EIO")]
    m.handle("t", VotedNo("vm1/d1: EIO"))
    assert m.handle("t", AbortRequested("no")) == [Rollback("t", p.members, (), "none", "no")]
    m.handle("t", Aborted("no"))
    assert m.handle("t", AbortRequested("again")) == []


def test_abort_while_frozen_thaws() -> None:
    m, p = ParticipantMachine(), plan()
    run(m, "t", CutPlanned(p), CutDone(1.0, 2.0, 6.0))
    assert m.handle("t", AbortRequested("x")) == [Rollback("t", p.members, ("vm1",), "freeze", "x")]


def test_failed_cut_rolls_back_and_thaws() -> None:
    m, p = ParticipantMachine(), plan()
    m.handle("t", CutPlanned(p))
    assert m.handle("t", CutFailed("boom")) == [Rollback("t", p.members, ("vm1",), "freeze",
                                                         "boom")]


def test_recovery_during_cut_undoes_it_and_while_frozen_thaws_on_own() -> None:
    m, p = ParticipantMachine(), plan()
    m.handle("t", CutPlanned(p))
    out = m.handle("t", Recovered())
    assert len(out) == 1 and isinstance(out[0], Rollback)
    m2 = ParticipantMachine()
    run(m2, "t", CutPlanned(p), CutDone(1.0, 2.0, 6.0))
    assert m2.handle("t", Recovered()) == [ThawGuests("t", ("vm1",), "freeze", on_own=True,
                                                      after_restart=True)]


def test_busy_disk_and_conflicting_retry_are_refused() -> None:
    m = ParticipantMachine()
    m.handle("a", CutPlanned(plan("a", disks=("d0",))))
    with pytest.raises(StateError):
        m.handle("b", CutPlanned(plan("b", disks=("d0", "d1"))))
    assert m.handle("a", CutPlanned(plan("a", disks=("d0",)))) == []   # same request: retry
    with pytest.raises(StateError):
        m.handle("a", CutPlanned(plan("a", disks=("d1",))))


def test_unknown_abort_is_remembered() -> None:
    m = ParticipantMachine()
    out = m.handle("x", AbortRequested("presumed"))
    assert out == [Rollback("x", (), (), "none", "presumed")]
    m.handle("x", Aborted("presumed"))
    with pytest.raises(StateError):
        m.handle("x", CutPlanned(plan("x")))
    with pytest.raises(StateError):
        m.handle("y", CommitRequested())


JOURNALED = [CutPlanned(plan()), CutDone(1.0, 2.0, 6.0, (("vm1", "d0", 5),)), Thawed(False, 3.0),
             MemberFailed("vm1", "", "gone"), Prepared(images(plan())), VotedNo("r"),
             Committed(images(plan())), Aborted("r"), CutFailed("x"), Freezing()]


@pytest.mark.parametrize("event", JOURNALED, ids=lambda e: type(e).__name__)
def test_journal_records_round_trip(event: Event) -> None:
    record = json.loads(json.dumps(event_to_record("t", event)))
    assert event_from_record(record) == ("t", event)


HISTORIES = st.lists(st.sampled_from([
    "thaw", "deadline", "fail", "prepare_ok", "prepare_no", "commit", "abort", "recover",
]), max_size=12)


@settings(max_examples=300, deadline=None)
@given(HISTORIES)
def test_replaying_the_journal_rebuilds_the_same_state(steps: list[str]) -> None:
    """Any history: replaying its journaled events gives the same phase and failure."""
    p = plan()
    live, journal = ParticipantMachine(), []

    def feed(e: Event) -> list[object]:
        if e.journaled:
            journal.append(json.loads(json.dumps(event_to_record("t", e))))
        out: list[object] = list(live.handle("t", e))
        live.validate_state()
        return out

    feed(CutPlanned(p))
    feed(CutDone(1.0, 2.0, 6.0))
    results = {"thaw": Thawed(False, 3.0), "deadline": Thawed(True, 6.0)}
    for step in steps:
        try:
            if step in ("thaw", "deadline"):
                out = feed(ThawRequested() if step == "thaw" else DeadlinePassed())
                if out:
                    feed(results[step])
            elif step == "fail":
                feed(MemberFailed("vm1", "d0", "EIO"))
            elif step in ("prepare_ok", "prepare_no"):
                for cmd in feed(PrepareRequested()):
                    if isinstance(cmd, FinalizeJobs) and step == "prepare_ok":
                        feed(Prepared(images(p)))
                    elif isinstance(cmd, (FinalizeJobs, DeclineVote)):
                        feed(VotedNo("no"))
            elif step == "commit":
                if feed(CommitRequested()):
                    feed(Committed(images(p)))
            elif step == "abort":
                if feed(AbortRequested("a")):
                    feed(Aborted("a"))
            elif step == "recover":
                for cmd in feed(Recovered()):
                    if isinstance(cmd, ThawGuests):
                        feed(Thawed(True, 7.0))
        except StateError:
            pass
        st_live = live.txns["t"]
        # single decision: never both committed and aborted; YES only without failure
        assert not (st_live.phase == Phase.PREPARED and st_live.thawed_on_own)
    replayed = ParticipantMachine()
    for record in journal:
        replayed.handle(*event_from_record(record))
    a, b = live.txns["t"], replayed.txns["t"]
    assert (a.phase, a.failure, a.thawed_on_own, a.images) == (
        b.phase, b.failure, b.thawed_on_own, b.images)


def test_individual_mode_leaves_a_failed_disk_out_and_publishes_the_rest() -> None:
    """Per disk, as in QEMU: a failed disk does not fail the transaction; the barrier
    is told which disks failed already; only the prepared disks are published."""
    m = ParticipantMachine()
    p = TxnPlan("t", (member("d0"), member("d1"), member("d0", "vm2")), "none", 5.0,
                individual=True)
    run(m, "t", CutPlanned(p), CutDone(0.0, 2.0, 7.0), MemberFailed("vm1", "d1", "io error"))
    assert m.txns["t"].failure == ""
    assert m.handle("t", PrepareRequested(30.0)) == [
        FinalizeJobs("t", p.members, 30.0, True, (("vm1", "d1", "io error"),))]
    kept = tuple(i for i in images(p) if (i.vm, i.disk) != ("vm1", "d1"))
    run(m, "t", Prepared(kept, (("vm1", "d1", "io error"),)))
    assert m.phase("t") == Phase.PREPARED
    assert m.handle("t", CommitRequested()) == [
        Publish("t", (p.members[0], p.members[2]), kept)]
    # the journal carries the plan's mode and the left-out disks
    for e in (CutPlanned(p), Prepared(kept, (("vm1", "d1", "io error"),))):
        assert event_from_record(json.loads(json.dumps(event_to_record("t", e)))) == ("t", e)


def test_individual_mode_fails_once_every_disk_failed() -> None:
    m = ParticipantMachine()
    p = TxnPlan("t", (member("d0"), member("d0", "vm2")), "none", 5.0, individual=True)
    run(m, "t", CutPlanned(p), CutDone(0.0, 2.0, 7.0), MemberFailed("vm1", "", "vm lost"))
    assert m.txns["t"].failure == ""
    run(m, "t", MemberFailed("vm2", "d0", "io error"))
    assert m.handle("t", PrepareRequested(30.0)) == [DeclineVote("t", "vm2/d0: io error")]


def test_grouped_mode_fails_on_one_disk() -> None:
    m, p = ParticipantMachine(), plan(quiesce="none")
    run(m, "t", CutPlanned(p), CutDone(0.0, 2.0, 7.0), MemberFailed("vm1", "d1", "io error"))
    assert m.handle("t", PrepareRequested(30.0)) == [DeclineVote("t", "vm1/d1: io error")]
