"""The agent's two-phase-commit participant machine: pure, no I/O, no asyncio.

``ParticipantMachine.handle(txn_id, event)`` applies one event to one
transaction and returns the commands a runner must execute; the runner feeds
the results back as events. Events whose class has ``journaled = True`` are the
participant's durable history: the runner writes them to the journal (fsync)
before handing them to the machine, and recovery replays them through the same
machine (the journal's encoding of them is in ``journal.py``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

from .errors import ConflictError


class Phase(enum.Enum):
    """Where one transaction stands on this host."""

    CUTTING = "cutting"
    FROZEN = "frozen"
    RUNNING = "running"
    PREPARED = "prepared"
    VOTED_NO = "voted_no"
    COMMITTED = "committed"
    ABORTED = "aborted"


OPEN_PHASES = frozenset(
    {Phase.CUTTING, Phase.FROZEN, Phase.RUNNING, Phase.PREPARED, Phase.VOTED_NO}
)


class StateError(ConflictError):
    """An event that is illegal in the transaction's current phase."""

    def __init__(self, txn_id: str, phase: Phase | None, event: object) -> None:
        self.txn_id = txn_id
        self.phase = phase
        where = phase.value if phase else "unknown"
        super().__init__(f"transaction {txn_id} is {where}: {type(event).__name__} not allowed")


# ----------------------------------------------------------------- plan types


@dataclass(frozen=True)
class MemberPlan:
    """Everything decided at cut time for one disk: names, mode, files."""

    vm: str
    disk: str
    mode: str  # "full" | "incremental"
    mode_reason: str
    new_bitmap: str
    sync_bitmap: str | None  # previous checkpoint an incremental copies from
    stale_bitmaps: tuple[str, ...]  # this agent's bitmaps to drop on commit
    job_id: str
    target_node: str
    image: str  # relative to the repository
    backing: str  # previous image ("" for full)
    size: int
    speed: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.vm, self.disk)


@dataclass(frozen=True)
class TxnPlan:
    txn_id: str
    members: tuple[MemberPlan, ...]
    quiesce: str  # "none" | "freeze" | "pause"
    freeze_timeout: float

    @property
    def vms(self) -> tuple[str, ...]:
        return tuple(sorted({m.vm for m in self.members}))

    def same_request(self, other: TxnPlan) -> bool:
        """True if *other* asks for the same disks with the same quiesce."""
        return {m.key for m in self.members} == {m.key for m in other.members} and (
            self.quiesce == other.quiesce
        )


@dataclass(frozen=True)
class ImageRecord:
    """One image a prepared/committed member produced."""

    vm: str
    disk: str
    set_id: str
    image: str
    backing: str
    mode: str
    bytes: int
    size: int
    cut_at: float
    checkpoint: str
    sha256: str = ""


# --------------------------------------------------------------------- events


@dataclass(frozen=True)
class Event:
    journaled: ClassVar[bool] = False


@dataclass(frozen=True)
class CutPlanned(Event):
    journaled: ClassVar[bool] = True
    plan: TxnPlan


@dataclass(frozen=True)
class CutDone(Event):
    journaled: ClassVar[bool] = True
    frozen_at: float
    cut_at: float
    freeze_deadline: float
    bytes_total: tuple[tuple[str, str, int], ...] = ()


@dataclass(frozen=True)
class CutFailed(Event):
    journaled: ClassVar[bool] = True
    reason: str


@dataclass(frozen=True)
class Thawed(Event):
    """The guests were thawed: by the coordinator's Thaw in time, or not (on_own: by
    the deadline, or a thaw that failed, left to the deadline's safety net)."""

    journaled: ClassVar[bool] = True
    on_own: bool
    at: float
    problem: str = ""


@dataclass(frozen=True)
class MemberFailed(Event):
    journaled: ClassVar[bool] = True
    vm: str
    disk: str  # "" for the whole VM
    reason: str


@dataclass(frozen=True)
class Prepared(Event):
    journaled: ClassVar[bool] = True
    images: tuple[ImageRecord, ...]


@dataclass(frozen=True)
class VotedNo(Event):
    journaled: ClassVar[bool] = True
    reason: str


@dataclass(frozen=True)
class Committed(Event):
    journaled: ClassVar[bool] = True
    images: tuple[ImageRecord, ...]


@dataclass(frozen=True)
class Aborted(Event):
    journaled: ClassVar[bool] = True
    reason: str


@dataclass(frozen=True)
class ThawRequested(Event):
    at: float = 0.0  # when the coordinator's thaw arrived (unix time)


@dataclass(frozen=True)
class DeadlinePassed(Event):
    pass


@dataclass(frozen=True)
class PrepareRequested(Event):
    timeout: float | None = None


@dataclass(frozen=True)
class CommitRequested(Event):
    pass


@dataclass(frozen=True)
class AbortRequested(Event):
    reason: str


@dataclass(frozen=True)
class Recovered(Event):
    """The agent restarted; the journal has been replayed."""


# ------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    txn_id: str


@dataclass(frozen=True)
class StartCut(Command):
    """Quiesce, then one QMP transaction per VM; feed CutDone or CutFailed."""

    plan: TxnPlan


@dataclass(frozen=True)
class ArmAutoThaw(Command):
    deadline: float


@dataclass(frozen=True)
class ThawGuests(Command):
    """Thaw the plan's VMs; feed Thawed(on_own). After a restart the agent no longer
    knows what it froze: ``after_restart`` thaws them all the same."""

    vms: tuple[str, ...]
    quiesce: str
    on_own: bool
    after_restart: bool = False


@dataclass(frozen=True)
class FinalizeJobs(Command):
    """Wait for pending, finalize, dismiss, close and fsync; feed Prepared or VotedNo."""

    members: tuple[MemberPlan, ...]
    timeout: float | None


@dataclass(frozen=True)
class DeclineVote(Command):
    """Feed VotedNo(reason) without touching QEMU."""

    reason: str


@dataclass(frozen=True)
class Publish(Command):
    """Drop the previous checkpoints, checksum and catalog the images; feed Committed."""

    members: tuple[MemberPlan, ...]
    images: tuple[ImageRecord, ...]


@dataclass(frozen=True)
class Rollback(Command):
    """Cancel jobs, delete targets and images, drop the new checkpoints, thaw; feed Aborted."""

    members: tuple[MemberPlan, ...]
    thaw_vms: tuple[str, ...]
    quiesce: str
    reason: str
    after_restart: bool = False  # thaw thaw_vms even if this process did not freeze them


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
    abort_reason: str = ""
    preparing: bool = False  # a barrier is running (not journaled: it dies with the process)

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
                assert {(i.vm, i.disk) for i in st.images} == {m.key for m in st.members}
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
            return [StartCut(txn_id, event.plan)]
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
        if isinstance(event, (ThawRequested, DeadlinePassed)):
            return []
        return None

    def _on_cutting(self, st: TxnState, event: Event) -> list[Command]:
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
            # Died in the middle of the cut: the outcome is unknown, so undo it.
            assert st.plan is not None
            reason = "agent restarted during the cut"
            st.fail(reason)
            return [Rollback(st.txn_id, st.members, st.plan.vms, st.plan.quiesce, reason,
                             after_restart=True)]
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
            return [FinalizeJobs(st.txn_id, st.members, event.timeout)]
        if isinstance(event, Prepared):
            st.images = event.images
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
            return [Publish(st.txn_id, st.members, st.images)]
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
        if isinstance(event, (MemberFailed, ThawRequested, DeadlinePassed, Thawed)):
            return []
        if isinstance(event, CutPlanned) and st.plan and st.plan.same_request(event.plan):
            return []
        raise StateError(st.txn_id, st.phase, event)

    def _on_aborted(self, st: TxnState, event: Event) -> list[Command]:
        if isinstance(event, (AbortRequested, Aborted, PrepareRequested, Recovered)):
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
