"""What the coordinator keeps about transactions, decisions, backup sets and agents:
immutable records, updated by making new ones. ``store.py`` alone turns them into
etcd values and back."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from blocktxn.requests import cut_text

from .errors import NotFoundError
from .txn_machine import TxnMachine
from .txn_messages import Decision, TxnPhase

MAX_ERRORS = 20  # errors a transaction record keeps, newest last
# Free texts a record keeps, cut to a bound (what an agent or QEMU says can be long; a
# record must fit one etcd request, see store.final_write_bound):
MAX_MEMBER_TEXT = 160   # a member's mode reason
MAX_VOTE_TEXT = 512     # an agent's vote reason
MAX_ERROR_TEXT = 512    # one remembered error
MAX_REASON_TEXT = 1024  # the decision's reason (the machine cuts it)
# (bounds in bytes of the stored JSON form: see blocktxn.requests.cut_text)


class _PlacesCache:
    """Where each agent's members are in a record's members tuple, for the last
    ``KEEP`` tuples seen (by identity: a tuple of a record never changes)."""

    KEEP = 256

    def __init__(self) -> None:
        self._known: OrderedDict[int, tuple[tuple[object, ...], dict[str, list[int]]]] = \
            OrderedDict()

    def get(self, members: tuple[object, ...]) -> dict[str, list[int]] | None:
        hit = self._known.get(id(members))
        if hit is None or hit[0] is not members:
            return None
        self._known.move_to_end(id(members))
        return hit[1]

    def remember(self, members: tuple[object, ...], places: dict[str, list[int]]) -> None:
        self._known[id(members)] = (members, places)  # (the tuple kept: its id stays its)
        self._known.move_to_end(id(members))
        while len(self._known) > self.KEEP:
            self._known.popitem(last=False)


_PLACES = _PlacesCache()


def _places(members: tuple[MemberRecord, ...]) -> dict[str, list[int]]:
    """agent id -> the places of its members in *members*."""
    places = _PLACES.get(members)
    if places is None:
        places = {}
        for i, m in enumerate(members):
            places.setdefault(m.agent_id, []).append(i)
        _PLACES.remember(members, places)
    return places


@dataclass(frozen=True)
class MemberRecord:
    """One disk of a transaction and how far it got."""

    agent_id: str
    vm: str
    disk: str
    mode: str                # requested: auto | full | incremental
    chosen: str = ""         # full | incremental, as the agent chose at the cut
    mode_reason: str = ""
    status: str = ""         # the job's status, "prepared" once voted
    done: int = 0            # bytes copied
    total: int = 0           # bytes to copy
    outcome: str = ""        # committed | aborted, once acknowledged

    @property
    def key(self) -> tuple[str, str, str]:
        return self.agent_id, self.vm, self.disk

    def cut_as(self, chosen: str, reason: str, total: int) -> MemberRecord:
        return replace(self, chosen=chosen, mode_reason=cut_text(reason, MAX_MEMBER_TEXT),
                       total=total)

    def progressed(self, status: str, done: int, total: int) -> MemberRecord:
        return replace(self, status=status, done=done, total=total)

    def prepared(self, done: int) -> MemberRecord:
        return replace(self, status="prepared", done=done)

    def completed(self, outcome: str) -> MemberRecord:
        return replace(self, outcome=outcome)


@dataclass(frozen=True)
class VoteRecord:
    agent_id: str
    yes: bool
    reason: str = ""
    at: float = 0.0          # when the vote reached the coordinator (unix time)


@dataclass(frozen=True)
class SetImage:
    """One disk's image in a backup set (as the agent reported it at commit)."""

    agent_id: str
    vm: str
    disk: str
    image: str               # path relative to the agent's repository
    backing: str             # the previous image of the chain, "" for a full
    mode: str                # full | incremental
    bytes: int
    size: int
    sha256: str
    cut_at: float
    checkpoint: str


@dataclass(frozen=True)
class BackupSet:
    """What a committed transaction produced: the catalog entry."""

    set_id: str
    txn_id: str
    cut_at: float
    images: tuple[SetImage, ...]
    agents: tuple[str, ...]
    bytes: int
    group: str = ""          # the retention group it counts in ("" : none)
    created_at: float = 0.0  # coordinator clock (retention buckets); 0: use cut_at
    removing: str = ""       # the prune that is removing it (then it is not listed)

    @classmethod
    def of(cls, txn_id: str, images: tuple[SetImage, ...], group: str = "",
           created_at: float = 0.0) -> BackupSet:
        return cls(set_id=txn_id, txn_id=txn_id, cut_at=min(i.cut_at for i in images),
                   images=images, agents=tuple(sorted({i.agent_id for i in images})),
                   bytes=sum(i.bytes for i in images), group=group, created_at=created_at)

    @property
    def time(self) -> float:
        """When it was taken, as retention counts it."""
        return self.created_at or self.cut_at

    @property
    def disks(self) -> frozenset[str]:
        return frozenset(f"{i.agent_id}/{i.vm}/{i.disk}" for i in self.images)


@dataclass(frozen=True)
class PruneRecord:
    """The durable intent to remove backup sets: written (with each set marked
    ``removing``) before any agent changes a file; deleted when every set is gone."""

    prune_id: str
    set_ids: tuple[str, ...]   # still to remove, oldest first
    created_at: float
    why: str = ""              # "forget", or "prune GROUP (POLICY)"


@dataclass(frozen=True)
class AuditRecord:
    """One mutating call: who, what, when, and how it ended."""

    at: float
    identity: str
    role: str
    method: str
    request: str             # the request as JSON, cut to MAX_AUDIT_TEXT
    code: str                # gRPC status code name
    detail: str = ""


@dataclass(frozen=True)
class ScheduleState:
    """What the leader did last for a schedule (one key per schedule, rewritten)."""

    name: str
    last_at: float           # the occurrence handled last (the first one seen: created)
    outcome: str             # created | started | refused | missed
    txn_id: str = ""         # started: the transaction of that occurrence
    error: str = ""          # refused or missed: why
    handled_at: float = 0.0  # when the leader handled it


@dataclass(frozen=True)
class DecisionRecord:
    """The decision: created once, never changed."""

    txn_id: str
    decision: Decision
    reason: str
    committed: tuple[str, ...] = ()
    at: float = 0.0
    by: str = ""

    @classmethod
    def presumed_abort(cls, txn_id: str, by: str) -> DecisionRecord:
        return cls(txn_id, Decision.ABORT, "presumed abort: deadline passed with no decision",
                   (), time.time(), by)


@dataclass(frozen=True)
class TxnRecord:
    """A transaction as clients see it and as etcd keeps it."""

    txn_id: str
    request_id: str
    completion: str          # grouped | individual
    quiesce: str             # none | freeze | pause
    freeze_timeout: float
    deadline: float          # unix time
    speed: int
    created_at: float
    members: tuple[MemberRecord, ...]
    agents: tuple[tuple[str, str], ...]  # (agent id, address), sorted
    phase: TxnPhase = TxnPhase.CUTTING
    decision: Decision | None = None
    reason: str = ""
    committed: tuple[str, ...] = ()
    votes: tuple[VoteRecord, ...] = ()
    errors: tuple[str, ...] = ()
    frozen_from: float = 0.0
    thawed_at: float = 0.0
    set_id: str = ""
    leader: str = ""
    images: tuple[SetImage, ...] = ()
    group: str = ""          # retention group of the set it makes
    cut_done_at: float = 0.0  # the cut ended: every agent answered, or it was abandoned
    decided_at: float = 0.0   # the decision was durable
    done_at: float = 0.0      # the final record was written

    @property
    def grouped(self) -> bool:
        return self.completion == "grouped"

    @property
    def agent_ids(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.agents)

    def address(self, agent_id: str) -> str:
        """Raises: NotFoundError if *agent_id* is not a member agent."""
        for a, address in self.agents:
            if a == agent_id:
                return address
        raise NotFoundError(f"agent {agent_id} is not in transaction {self.txn_id}")

    def members_of(self, agent_id: str) -> tuple[MemberRecord, ...]:
        return tuple(self.members[i] for i in _places(self.members).get(agent_id, ()))

    def with_members(self, agent_id: str, change: Callable[[MemberRecord], MemberRecord]
                     ) -> TxnRecord:
        """*change* applied to every member of *agent_id* (the others are not looked
        at: each agent's reply costs its own members, not the transaction's)."""
        places = _places(self.members)
        members = list(self.members)
        for i in places.get(agent_id, ()):
            members[i] = change(members[i])
        changed = tuple(members)
        _PLACES.remember(changed, places)  # the same places: only values changed
        return replace(self, members=changed)

    def with_outcome(self, agent_id: str, outcome: str) -> TxnRecord:
        """Every member of *agent_id* completed with *outcome*; a COMMIT counts only the
        disks the agent published (individual mode leaves failed disks out)."""
        published = {(i.vm, i.disk) for i in self.images if i.agent_id == agent_id}
        return self.with_members(agent_id, lambda m: m.completed(
            "aborted" if outcome == "committed" and (m.vm, m.disk) not in published
            else outcome))

    def with_frozen_at(self, frozen_at: float) -> TxnRecord:
        """The earliest freeze of any agent (0: none)."""
        if frozen_at and (not self.frozen_from or frozen_at < self.frozen_from):
            return replace(self, frozen_from=frozen_at)
        return self

    def with_thawed_at(self, thawed_at: float) -> TxnRecord:
        return replace(self, thawed_at=max(self.thawed_at, thawed_at))

    def with_error(self, error: str) -> TxnRecord:
        """Remember *error* (the last MAX_ERRORS only: a record must stay small)."""
        return replace(self,
                       errors=(*self.errors, cut_text(error, MAX_ERROR_TEXT))[-MAX_ERRORS:])

    def with_images(self, images: tuple[SetImage, ...]) -> TxnRecord:
        return replace(self, images=(*self.images, *images))

    def with_machine(self, machine: TxnMachine, now: float = 0.0) -> TxnRecord:
        """The machine's view: phase, decision, votes (a vote new since the last view,
        and the end of the cut, are stamped *now*)."""
        seen = {v.agent_id: v for v in self.votes}
        cut_done = self.cut_done_at or (now if machine.phase != TxnPhase.CUTTING else 0.0)
        votes = []
        for p in machine.parts.values():
            if p.vote is None:
                continue
            v = seen.get(p.agent_id)
            if v is None or v.yes != p.vote or (v.reason != p.reason and v.reason != cut_text(
                    p.reason, MAX_VOTE_TEXT)):  # (a vote seen before is kept as it is)
                v = VoteRecord(p.agent_id, p.vote, cut_text(p.reason, MAX_VOTE_TEXT),
                               v.at if v is not None and v.at else now)
            votes.append(v)
        return replace(
            self, phase=machine.phase, decision=machine.decision,
            reason=cut_text(machine.reason, MAX_REASON_TEXT), committed=machine.committed,
            votes=tuple(votes), cut_done_at=cut_done)

    def with_decision(self, decision: DecisionRecord) -> TxnRecord:
        return replace(self, decision=decision.decision, reason=decision.reason)

    def backup_set(self, now: float = 0.0) -> BackupSet | None:
        """The catalog entry of a transaction that committed images."""
        if self.decision != Decision.COMMIT or not self.images:
            return None
        return BackupSet.of(self.txn_id, self.images, self.group, now)


@dataclass(frozen=True)
class DiskEntry:
    """One disk in an agent's inventory."""

    name: str
    size: int = 0
    format: str = ""
    checkpoint: str = ""
    checkpoint_usable: bool = False
    checkpoint_problem: str = ""
    busy_txn: str = ""


@dataclass(frozen=True)
class VmEntry:
    """One VM in an agent's inventory."""

    name: str
    connected: bool = False
    disks: tuple[DiskEntry, ...] = ()
    jobs: tuple[str, ...] = ()
    frozen: bool = False
    has_guest_agent: bool = False


@dataclass(frozen=True)
class AgentInventory:
    """What an agent reported at its last registration."""

    agent_id: str = ""
    vms: tuple[VmEntry, ...] = ()
    open_transactions: tuple[str, ...] = ()
    repo_capacity: int = 0
    repo_free: int = 0

    def vm(self, name: str) -> VmEntry | None:
        return next((v for v in self.vms if v.name == name), None)


@dataclass(frozen=True)
class AgentEntry:
    """A registered agent: where to reach it and what it has."""

    agent_id: str
    address: str
    inventory: AgentInventory
    last_seen: float = 0.0
