"""The agent's two-phase-commit participant machine: pure, no I/O, no asyncio.

``ParticipantMachine.handle(txn_id, event)`` applies one event to one
transaction and returns the commands a runner must execute; the runner feeds
the results back as events. Events whose class has ``journaled = True`` are the
participant's durable history: the runner writes them to the journal (fsync)
before handing them to the machine, and recovery replays them through the same
machine (the journal's encoding of them is in ``journal.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .participant_messages import (
    OPEN_PHASES,
    Aborted,
    AbortRequested,
    ArmAutoThaw,
    Command,
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

# ---------------------------------------------------------------------- state


@dataclass
class TxnState:
    txn_id: str
    phase: Phase
    plan: TxnPlan | None = None
    failure: str = ""
    thawed_on_own: bool = False
    frozen_at: float = 0.0
    cut_at: float = 0.0
    freeze_deadline: float = 0.0
    thawed_at: float = 0.0
    bytes_total: dict[tuple[str, str], int] = field(default_factory=dict)
    images: tuple[ImageRecord, ...] = ()
    left_out: tuple[tuple[str, str, str], ...] = ()  # individual: (vm, disk, why) rolled back
    failed: dict[tuple[str, str], str] = field(default_factory=dict)  # individual, per disk
    abort_reason: str = ""
    preparing: bool = False  # a barrier is running (not journaled: it dies with the process)
    staged: bool = False     # the cut's targets are ready (not journaled either)
    cut_wanted: bool = False  # the freeze and start were asked for
    freezing: bool = False  # the cut began to quiesce (journaled: Freezing)

    @property
    def members(self) -> tuple[MemberPlan, ...]:
        return self.plan.members if self.plan else ()

    def fail(self, reason: str) -> None:
        if not self.failure:
            self.failure = reason


class ParticipantMachine:
    """All transactions of one agent."""

    def __init__(self) -> None:
        self.txns: dict[str, TxnState] = {}

    # -- queries
    def phase(self, txn_id: str) -> Phase | None:
        st = self.txns.get(txn_id)
        return st.phase if st else None

    def busy_disks(self) -> dict[tuple[str, str], str]:
        """(vm, disk) -> txn id, for every disk held by an open transaction."""
        return {
            m.key: st.txn_id
            for st in self.txns.values()
            if st.phase in OPEN_PHASES
            for m in st.members
        }

    def quiesce_holders(self) -> dict[str, str]:
        """vm -> the transaction that may hold it quiesced: from the plan of a cut on,
        until the thaw (a freeze is VM-wide: one transaction at a time)."""
        return {
            vm: st.txn_id
            for st in self.txns.values()
            if st.phase in (Phase.CUTTING, Phase.FROZEN) and st.plan and st.plan.quiesce != "none"
            for vm in st.plan.vms
        }

    def may_abort_alone(self, txn_id: str) -> bool:
        """True while *txn_id* is planned or staged and no Cut has asked it to freeze
        and start. It never voted and cannot vote YES without that Cut first, so no
        coordinator can commit it: this agent may roll it back on its own (a later Cut
        is then refused and a Prepare answered NO). Never once the Cut runs: from then
        on only the coordinator's abort (or a NO vote) ends it."""
        st = self.txns.get(txn_id)
        return st is not None and st.phase == Phase.CUTTING and not st.cut_wanted

    def open_txns(self) -> list[str]:
        return sorted(t for t, st in self.txns.items() if st.phase in OPEN_PHASES)

    def validate_state(self) -> None:
        """Check the machine's invariants; raise AssertionError on a violation."""
        held: dict[tuple[str, str], str] = {}
        for st in self.txns.values():
            if st.phase in OPEN_PHASES:
                for m in st.members:
                    assert m.key not in held, f"disk {m.key} in {held[m.key]} and {st.txn_id}"
                    held[m.key] = st.txn_id
            if st.phase in (Phase.PREPARED, Phase.COMMITTED):
                out = {(vm, disk) for vm, disk, _ in st.left_out}
                assert {(i.vm, i.disk) for i in st.images} == {m.key for m in st.members} - out
                assert st.images and (not out or (st.plan is not None and st.plan.individual))
                assert not st.failure or st.phase == Phase.COMMITTED or st.thawed_on_own is False
            if st.thawed_on_own:
                assert st.phase not in (Phase.PREPARED, Phase.COMMITTED)

    # -- the one entry point
    def handle(self, txn_id: str, event: Event) -> list[Command]:
        """Apply *event* to transaction *txn_id*; return what the runner must do.

        Raises:
            StateError: the event is not allowed in the current phase.
        """
        st = self.txns.get(txn_id)
        if st is None:
            return self._handle_unknown(txn_id, event)
        handler = getattr(self, f"_on_{st.phase.value}")
        result: list[Command] = handler(st, event)
        return result

    # -- transitions
    def _handle_unknown(self, txn_id: str, event: Event) -> list[Command]:
        if isinstance(event, CutPlanned):
            busy = self.busy_disks()
            for m in event.plan.members:
                if m.key in busy:
                    raise StateError(txn_id, None, event)
            self.txns[txn_id] = TxnState(txn_id, Phase.CUTTING, plan=event.plan)
            return [StageCut(txn_id, event.plan)]
        if isinstance(event, AbortRequested):
            # Presumed abort of a transaction this host never cut: remember it,
            # so that a late Cut with the same id is refused.
            return [Rollback(txn_id, (), (), "none", event.reason)]
        if isinstance(event, Aborted):
            self.txns[txn_id] = TxnState(txn_id, Phase.ABORTED, abort_reason=event.reason)
            return []
        raise StateError(txn_id, None, event)

    def _common(self, st: TxnState, event: Event) -> list[Command] | None:
        """Events with the same meaning in every open phase."""
        if isinstance(event, MemberFailed):
            if st.phase in (Phase.CUTTING, Phase.FROZEN, Phase.RUNNING):
                if st.plan is not None and st.plan.individual:
                    # per disk, as in QEMU: the transaction fails once no disk is left
                    for m in st.members:
                        if m.vm == event.vm and event.disk in ("", m.disk):
                            st.failed.setdefault(m.key, event.reason)
                    if len(st.failed) < len(st.members):
                        return []
                st.fail(f"{event.vm}{'/' + event.disk if event.disk else ''}: {event.reason}")
            return []
        if isinstance(event, AbortRequested):
            thaw = st.plan.vms if st.phase in (Phase.CUTTING, Phase.FROZEN) and st.plan else ()
            quiesce = st.plan.quiesce if st.plan else "none"
            return [Rollback(st.txn_id, st.members, thaw, quiesce, event.reason)]
        if isinstance(event, Aborted):
            st.phase = Phase.ABORTED
            st.abort_reason = event.reason
            return []
        if isinstance(event, CutPlanned):
            if st.plan is not None and st.plan.same_request(event.plan):
                return []  # a retried Cut: answered from the state
            raise StateError(st.txn_id, st.phase, event)
        if isinstance(event, (ThawRequested, DeadlinePassed, CutRequested)):
            return []  # a Cut after the cut: answered from the state
        return None

    def _on_cutting(self, st: TxnState, event: Event) -> list[Command]:
        assert st.plan is not None
        if isinstance(event, Staged) and not st.staged:
            st.staged = True
            if st.cut_wanted and st.failure:
                return [Rollback(st.txn_id, st.members, st.plan.vms, st.plan.quiesce,
                                 st.failure)]
            return [StartCut(st.txn_id, st.plan)] if st.cut_wanted else []
        if isinstance(event, CutRequested):
            if st.cut_wanted:
                return []  # a retried Cut waits for the one running
            st.cut_wanted = True
            if st.failure:  # e.g. a VM lost since the stage: freeze nothing, roll back
                return [Rollback(st.txn_id, st.members, st.plan.vms, st.plan.quiesce,
                                 st.failure)]
            return [StartCut(st.txn_id, st.plan)] if st.staged else []
        if isinstance(event, Freezing):
            st.freezing = True
            return []
        if isinstance(event, CutDone):
            st.frozen_at, st.cut_at = event.frozen_at, event.cut_at
            st.freeze_deadline = event.freeze_deadline
            st.bytes_total = {(vm, disk): n for vm, disk, n in event.bytes_total}
            if st.plan is not None and st.plan.quiesce != "none":
                st.phase = Phase.FROZEN
                return [ArmAutoThaw(st.txn_id, event.freeze_deadline)]
            st.phase = Phase.RUNNING
            return []
        if isinstance(event, CutFailed):
            st.fail(event.reason)
            assert st.plan is not None
            return [Rollback(st.txn_id, st.members, st.plan.vms, st.plan.quiesce, event.reason)]
        if isinstance(event, Recovered):
            # Died in the middle of the cut: the outcome is unknown, so undo it. Only a
            # cut that began to freeze (Freezing journaled) may have left guests frozen:
            # those are thawed whoever holds them; otherwise the freeze state of the
            # guests is not ours and stays as it is.
            assert st.plan is not None
            reason = "agent restarted during the cut"
            st.fail(reason)
            return [Rollback(st.txn_id, st.members, st.plan.vms, st.plan.quiesce, reason,
                             after_restart=st.freezing)]
        return self._or_raise(st, event)

    def _on_frozen(self, st: TxnState, event: Event) -> list[Command]:
        assert st.plan is not None
        if isinstance(event, ThawRequested):
            # A thaw that arrives past the deadline is too late: the watchdog may have
            # thawed the guest already, so the frozen intervals need not overlap.
            late = bool(st.freeze_deadline) and event.at >= st.freeze_deadline
            return [ThawGuests(st.txn_id, st.plan.vms, st.plan.quiesce, on_own=late)]
        if isinstance(event, (DeadlinePassed, Recovered)):
            return [ThawGuests(st.txn_id, st.plan.vms, st.plan.quiesce, on_own=True,
                               after_restart=isinstance(event, Recovered))]
        if isinstance(event, Thawed):
            st.phase = Phase.RUNNING
            st.thawed_at = event.at
            if event.on_own:
                st.thawed_on_own = True
                st.fail(event.problem or "freeze deadline passed before the coordinator's thaw")
            return []
        return self._or_raise(st, event)

    def _on_running(self, st: TxnState, event: Event) -> list[Command]:
        if isinstance(event, PrepareRequested):
            if st.failure:
                return [DeclineVote(st.txn_id, st.failure)]
            if st.preparing:
                return []  # a repeated Prepare waits for the barrier already running
            st.preparing = True
            assert st.plan is not None
            return [FinalizeJobs(st.txn_id, st.members, event.timeout, st.plan.individual,
                                 tuple((vm, disk, why) for (vm, disk), why in st.failed.items()))]
        if isinstance(event, Prepared):
            st.images, st.left_out = event.images, event.left_out
            st.phase = Phase.PREPARED
            return []
        if isinstance(event, VotedNo):
            st.fail(event.reason)
            st.phase = Phase.VOTED_NO
            return []
        if isinstance(event, (Recovered, Thawed)):
            return []
        return self._or_raise(st, event)

    def _on_prepared(self, st: TxnState, event: Event) -> list[Command]:
        if isinstance(event, CommitRequested):
            prepared = {(i.vm, i.disk) for i in st.images}
            return [Publish(st.txn_id, tuple(m for m in st.members if m.key in prepared),
                            st.images)]
        if isinstance(event, Committed):
            st.images = event.images
            st.phase = Phase.COMMITTED
            return []
        if isinstance(event, (PrepareRequested, Recovered, Thawed)):
            return []
        return self._or_raise(st, event)

    def _on_voted_no(self, st: TxnState, event: Event) -> list[Command]:
        if isinstance(event, (PrepareRequested, Recovered, Thawed, VotedNo)):
            return []
        return self._or_raise(st, event)

    def _on_committed(self, st: TxnState, event: Event) -> list[Command]:
        if isinstance(event, (CommitRequested, Committed, PrepareRequested, Recovered)):
            return []
        if isinstance(event, (MemberFailed, ThawRequested, DeadlinePassed, Thawed,
                              CutRequested)):
            return []
        if isinstance(event, CutPlanned) and st.plan and st.plan.same_request(event.plan):
            return []
        raise StateError(st.txn_id, st.phase, event)

    def _on_aborted(self, st: TxnState, event: Event) -> list[Command]:
        if isinstance(event, (AbortRequested, Aborted, PrepareRequested, Recovered,
                              CutRequested)):
            return []
        # A barrier that was running when the abort came reports late: nothing to do,
        # the rollback already cancelled its jobs and deleted its images.
        if isinstance(event, (MemberFailed, ThawRequested, DeadlinePassed, Thawed, VotedNo,
                              Prepared)):
            return []
        raise StateError(st.txn_id, st.phase, event)

    def _or_raise(self, st: TxnState, event: Event) -> list[Command]:
        common = self._common(st, event)
        if common is None:
            raise StateError(st.txn_id, st.phase, event)
        return common
