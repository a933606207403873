"""The participant machine's vocabulary: phases, the plan of a cut, the events it
takes and the commands it returns (the machine itself is in ``participant.py``, the
journal's encoding of the events in ``journal.py``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
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
    individual: bool = False  # per-disk completion: a failed disk is left out, not fatal

    @property
    def vms(self) -> tuple[str, ...]:
        return tuple(sorted({m.vm for m in self.members}))

    def same_request(self, other: TxnPlan) -> bool:
        """True if *other* asks for the same disks with the same quiesce and completion."""
        return {m.key for m in self.members} == {m.key for m in other.members} and (
            self.quiesce == other.quiesce and self.individual == other.individual
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
    # A journaled event is fsynced before the machine sees it, unless it only has to
    # outlive the agent's process, not the host (see Freezing).
    fsync: ClassVar[bool] = True


@dataclass(frozen=True)
class CutPlanned(Event):
    journaled: ClassVar[bool] = True
    plan: TxnPlan


@dataclass(frozen=True)
class Freezing(Event):
    """The cut is about to quiesce its first guest: from here on this agent may have
    frozen them. Without it in the journal, a restarted agent knows it froze nothing
    and leaves the guests' freeze state alone (a freeze held by someone else, e.g. an
    operator's fsfreeze, is not ours to end).

    Written just before the freeze, with no fsync: it only has to survive the agent's
    process (a write in the page cache does), not the host: a host crash takes its
    guests down with it, so nothing stays frozen to be thawed. A later fsynced record
    (CutDone, Aborted) makes it durable as well."""

    journaled: ClassVar[bool] = True
    fsync: ClassVar[bool] = False


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
    """The vote YES: *images* of the prepared disks. In individual mode *left_out*
    holds (vm, disk, why) of each disk that failed and was rolled back already."""

    journaled: ClassVar[bool] = True
    images: tuple[ImageRecord, ...]
    left_out: tuple[tuple[str, str, str], ...] = ()


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
class Staged(Event):
    """The targets are created and open, the freeze safety net ready (not journaled:
    a restart rolls a cut back whatever it had staged)."""


@dataclass(frozen=True)
class CutRequested(Event):
    """The Cut that freezes and starts (after a stage, or a Cut without one)."""


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
class StageCut(Command):
    """Create and open the targets, ready the freeze safety net; feed Staged or
    CutFailed."""

    plan: TxnPlan


@dataclass(frozen=True)
class StartCut(Command):
    """Quiesce, then one QMP transaction per VM (the targets staged); feed CutDone or
    CutFailed."""

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
    """Wait for pending, finalize, dismiss, close and fsync; feed Prepared or VotedNo.
    With *individual*, each disk prepares on its own: the ones that fail (and those in
    *failed*: (vm, disk, why) known already) are rolled back and left out."""

    members: tuple[MemberPlan, ...]
    timeout: float | None
    individual: bool = False
    failed: tuple[tuple[str, str, str], ...] = ()


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
    #                              (only when the journal says a freeze began: Freezing)
