"""The coordinator's transaction machine: pure two-phase commit, no I/O.

``TxnMachine.handle(event)`` returns the commands the runner executes (RPCs to
agents, durable writes); their results come back as events. The decision is
only ever taken from ``DecisionDurable`` — the outcome of the fenced
create-if-absent write — so a machine never acts on a decision that is not
the durable one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class TxnPhase(enum.Enum):
    CUTTING = "cutting"
    THAWING = "thawing"
    RUNNING = "running"
    DECIDED = "decided"
    DONE = "done"


class Decision(enum.Enum):
    COMMIT = "commit"
    ABORT = "abort"


OPEN = frozenset({TxnPhase.CUTTING, TxnPhase.THAWING, TxnPhase.RUNNING, TxnPhase.DECIDED})


@dataclass(frozen=True)
class MemberSpec:
    agent_id: str
    vm: str
    disk: str
    mode: str  # auto | full | incremental


@dataclass
class AgentPart:
    agent_id: str
    cut: bool | None = None
    thawed: bool | None = None
    vote: bool | None = None
    reason: str = ""
    acked: bool = False


# -------------------------------------------------------------------- events
@dataclass(frozen=True)
class TxnEvent:
    pass


@dataclass(frozen=True)
class Begin(TxnEvent):
    pass


@dataclass(frozen=True)
class CutReplied(TxnEvent):
    agent_id: str
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class ThawReplied(TxnEvent):
    agent_id: str
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class Persisted(TxnEvent):
    """The RUNNING marker is durable (a new leader will re-query, not abort)."""


@dataclass(frozen=True)
class VoteReplied(TxnEvent):
    agent_id: str
    yes: bool
    reason: str = ""


@dataclass(frozen=True)
class DecisionDurable(TxnEvent):
    decision: Decision
    reason: str
    committed: tuple[str, ...]


@dataclass(frozen=True)
class Acked(TxnEvent):
    agent_id: str


@dataclass(frozen=True)
class CancelRequested(TxnEvent):
    reason: str


@dataclass(frozen=True)
class DeadlinePassed(TxnEvent):
    pass


@dataclass(frozen=True)
class Resumed(TxnEvent):
    """A new leader took the transaction over from its durable record."""


# ------------------------------------------------------------------ commands
@dataclass(frozen=True)
class TxnCommand:
    pass


@dataclass(frozen=True)
class SendCut(TxnCommand):
    agent_id: str


@dataclass(frozen=True)
class SendThaw(TxnCommand):
    agent_id: str


@dataclass(frozen=True)
class PersistRunning(TxnCommand):
    pass


@dataclass(frozen=True)
class SendPrepare(TxnCommand):
    agent_id: str


@dataclass(frozen=True)
class WriteDecision(TxnCommand):
    decision: Decision
    reason: str
    committed: tuple[str, ...]


@dataclass(frozen=True)
class SendCommit(TxnCommand):
    agent_id: str


@dataclass(frozen=True)
class SendAbort(TxnCommand):
    agent_id: str
    reason: str


@dataclass(frozen=True)
class Finish(TxnCommand):
    """Write the final record (and the backup set when something committed)."""


class TxnStateError(Exception):
    """An event that makes no sense in the current phase."""


@dataclass
class TxnMachine:
    """One transaction, from the cut to the last acknowledgement."""

    txn_id: str
    agents: tuple[str, ...]
    grouped: bool = True
    phase: TxnPhase = TxnPhase.CUTTING
    parts: dict[str, AgentPart] = field(default_factory=dict)
    decision: Decision | None = None
    reason: str = ""
    committed: tuple[str, ...] = ()
    deciding: bool = False  # a WriteDecision is in flight

    def __post_init__(self) -> None:
        if not self.parts:
            self.parts = {a: AgentPart(a) for a in self.agents}

    @classmethod
    def recovered(cls, txn_id: str, agents: tuple[str, ...], grouped: bool, running: bool,
                  decision: Decision | None, reason: str = "", committed: tuple[str, ...] = ()
                  ) -> TxnMachine:
        """The machine a new leader rebuilds from the durable record and decision."""
        m = cls(txn_id, agents, grouped)
        if running:
            m.phase = TxnPhase.RUNNING
        if decision is not None:
            m.decision, m.reason, m.committed = decision, reason, committed
            m.phase = TxnPhase.DECIDED
            for a in committed:  # a COMMIT names exactly the agents that voted YES
                m.parts[a].vote = True
        return m

    # ----------------------------------------------------------------- API
    def handle(self, event: TxnEvent) -> list[TxnCommand]:
        """Apply one event; return the commands to run.

        Raises:
            TxnStateError: the event is impossible here (a bug in the runner).
        """
        if isinstance(event, DecisionDurable):
            return self._on_decision(event)
        if isinstance(event, Acked):
            return self._on_acked(event)
        if isinstance(event, Resumed):
            return self._on_resumed()
        if self.decision is not None or self.deciding:
            return []  # late replies, cancels and deadlines change nothing once deciding
        if isinstance(event, (CancelRequested, DeadlinePassed)):
            why = event.reason if isinstance(event, CancelRequested) else "deadline passed"
            return self._decide(Decision.ABORT, why)
        if isinstance(event, Begin):
            return self._on_begin()
        if isinstance(event, CutReplied):
            return self._on_cut(event)
        if isinstance(event, ThawReplied):
            return self._on_thaw(event)
        if isinstance(event, Persisted):
            return self._on_persisted()
        if isinstance(event, VoteReplied):
            return self._on_vote(event)
        raise TxnStateError(f"{self.txn_id}: unknown event {event!r}")

    def validate(self) -> None:
        """Invariants after every step (used by the tests)."""
        if self.decision == Decision.COMMIT:
            if self.grouped:
                assert set(self.committed) == set(self.agents)
                assert all(p.vote for p in self.parts.values())
            assert all(self.parts[a].vote for a in self.committed)
        if self.phase in (TxnPhase.DECIDED, TxnPhase.DONE):
            assert self.decision is not None
        if self.phase == TxnPhase.DONE:
            assert all(p.acked for p in self.parts.values())

    # --------------------------------------------------------- transitions
    def _decide(self, decision: Decision, reason: str) -> list[TxnCommand]:
        self.deciding = True
        committed: tuple[str, ...] = ()
        if decision == Decision.COMMIT:
            committed = tuple(a for a in self.agents if self.parts[a].vote)
        return [WriteDecision(decision, reason, committed)]

    def _on_begin(self) -> list[TxnCommand]:
        if self.phase != TxnPhase.CUTTING:
            raise TxnStateError(f"{self.txn_id}: begin in {self.phase.value}")
        return [SendCut(a) for a in self.agents]

    def _on_cut(self, event: CutReplied) -> list[TxnCommand]:
        if self.phase != TxnPhase.CUTTING:
            return []
        part = self.parts[event.agent_id]
        part.cut = event.ok
        if not event.ok:
            return self._decide(Decision.ABORT, f"cut failed on {event.agent_id}: {event.error}")
        if all(p.cut for p in self.parts.values()):
            self.phase = TxnPhase.THAWING  # every VM frozen at once: the cut is consistent
            return [SendThaw(a) for a in self.agents]
        return []

    def _on_thaw(self, event: ThawReplied) -> list[TxnCommand]:
        if self.phase != TxnPhase.THAWING:
            return []
        part = self.parts[event.agent_id]
        part.thawed = event.ok
        if not event.ok:
            return self._decide(Decision.ABORT, f"thaw on {event.agent_id}: {event.error}")
        if all(p.thawed for p in self.parts.values()):
            return [PersistRunning()]
        return []

    def _on_persisted(self) -> list[TxnCommand]:
        if self.phase != TxnPhase.THAWING:
            return []
        self.phase = TxnPhase.RUNNING
        return [SendPrepare(a) for a in self.agents]

    def _on_vote(self, event: VoteReplied) -> list[TxnCommand]:
        if self.phase != TxnPhase.RUNNING:
            return []
        part = self.parts[event.agent_id]
        part.vote, part.reason = event.yes, event.reason
        if self.grouped and not event.yes:
            return self._decide(Decision.ABORT, f"{event.agent_id} voted NO: {event.reason}")
        if any(p.vote is None for p in self.parts.values()):
            return []
        if any(p.vote for p in self.parts.values()):
            no = [f"{p.agent_id}: {p.reason}" for p in self.parts.values() if not p.vote]
            return self._decide(Decision.COMMIT, "; ".join(no))
        return self._decide(Decision.ABORT, "every agent voted NO")

    def _on_decision(self, event: DecisionDurable) -> list[TxnCommand]:
        if self.decision is not None:
            if self.decision != event.decision:
                raise TxnStateError(f"{self.txn_id}: second decision {event.decision}")
            return []
        self.decision, self.reason, self.committed = event.decision, event.reason, event.committed
        self.deciding = False
        self.phase = TxnPhase.DECIDED
        return self._completion()

    def _completion(self) -> list[TxnCommand]:
        cmds: list[TxnCommand] = []
        for a in self.agents:
            if self.parts[a].acked:
                continue
            if self.decision == Decision.COMMIT and a in self.committed:
                cmds.append(SendCommit(a))
            else:
                cmds.append(SendAbort(a, self.reason))
        if not cmds:
            self.phase = TxnPhase.DONE
            return [Finish()]
        return cmds

    def _on_acked(self, event: Acked) -> list[TxnCommand]:
        if self.phase != TxnPhase.DECIDED:
            return []
        self.parts[event.agent_id].acked = True
        if all(p.acked for p in self.parts.values()):
            self.phase = TxnPhase.DONE
            return [Finish()]
        return []

    def _on_resumed(self) -> list[TxnCommand]:
        if self.phase == TxnPhase.DONE:
            return []
        if self.decision is not None:
            return self._completion()
        self.deciding = False
        if self.phase == TxnPhase.RUNNING:
            for p in self.parts.values():
                p.vote = None
            return [SendPrepare(a) for a in self.agents]  # re-query: Prepare is idempotent
        return self._decide(Decision.ABORT, "coordinator leader changed during the cut")
