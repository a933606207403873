"""The coordinator's transaction machine: pure two-phase commit, no I/O.

``TxnMachine.handle(event)`` returns the commands the driver executes (RPCs to
agents, durable writes); their results come back as events. The decision is only
ever taken from ``DecisionDurable`` — the outcome of the fenced create-if-absent
write — so a machine never acts on a decision that is not the durable one.

Every reply answers one command the machine issued. A reply that arrives after
the transaction moved on (a cut reply after another cut failed, any reply while
the decision is being written or after it) is recorded and changes nothing; a
repeated identical reply is harmless. Anything else — a reply to a command never
sent, a contradicting repeat, an event of the wrong phase — raises TxnStateError
and leaves the machine unchanged.

A new leader rebuilds the machine by replaying the durable records through it
(``RecordLoaded``, ``MarkedRunning``, ``DecisionDurable``), then ``Resumed``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blocktxn.requests import MAX_REASON, cut_text

from .errors import TxnStateError
from .txn_messages import (
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


class Step(enum.Enum):
    """A fan-out the machine has asked for (replies to it may come)."""

    STAGE = "stage"
    CUT = "cut"
    THAW = "thaw"
    PERSIST = "persist"
    PREPARE = "prepare"


@dataclass
class AgentPart:
    agent_id: str
    staged: bool | None = None
    cut: bool | None = None
    thawed: bool | None = None
    vote: bool | None = None
    reason: str = ""
    acked: bool = False


@dataclass
class TxnMachine:
    """One transaction, from the cut to the last acknowledgement."""

    txn_id: str
    agents: tuple[str, ...]
    grouped: bool = True
    quiesce: str = "freeze"  # none: no stage round and no thaw round (nothing frozen)
    phase: TxnPhase = TxnPhase.CUTTING
    parts: dict[str, AgentPart] = field(default_factory=dict)
    decision: Decision | None = None
    reason: str = ""
    committed: tuple[str, ...] = ()
    deciding: bool = False      # a WriteDecision is in flight
    started: bool = False       # Begin or RecordLoaded seen
    recovering: bool = False    # replaying durable records, until Resumed
    asked: set[Step] = field(default_factory=set)
    persisted: bool = False

    def __post_init__(self) -> None:
        if not self.parts:
            self.parts = {a: AgentPart(a) for a in self.agents}

    @property
    def quiesced(self) -> bool:
        """The guests are frozen or paused in the cut: stage every agent first (so
        that the freeze window holds no preparation), and thaw them after."""
        return self.quiesce != "none"

    # ----------------------------------------------------------------- API
    def handle(self, event: TxnEvent) -> list[TxnCommand]:
        """Apply one event; return the commands to run.

        Raises:
            TxnStateError: the event is not allowed now; nothing changed.
        """
        handler = _HANDLERS.get(type(event))
        if handler is None:
            raise self._refuse(event, "unknown event")
        replay = isinstance(event, (RecordLoaded, MarkedRunning, Resumed))
        if replay and not self.recovering and not isinstance(event, RecordLoaded):
            raise self._refuse(event, "not replaying")
        if self.recovering and not replay and not isinstance(event, DecisionDurable):
            raise self._refuse(event, "still replaying")
        if not self.started and not isinstance(event, (Begin, RecordLoaded)):
            raise self._refuse(event, "not started")
        return handler(self, event)

    def validate(self) -> None:
        """Invariants after every step (the driver and the tests call it)."""
        if self.decision == Decision.COMMIT:
            if self.grouped:
                assert set(self.committed) == set(self.agents)
                assert all(p.vote for p in self.parts.values())
            assert all(self.parts[a].vote for a in self.committed)
        if self.phase in (TxnPhase.DECIDED, TxnPhase.DONE):
            assert self.decision is not None
        if self.phase == TxnPhase.DONE:
            assert all(p.acked for p in self.parts.values())
        if Step.CUT in self.asked and self.quiesced:
            assert all(p.staged for p in self.parts.values())
        if self.phase in (TxnPhase.THAWING, TxnPhase.RUNNING):
            assert all(p.cut for p in self.parts.values())
        if self.phase == TxnPhase.RUNNING:
            assert all(p.thawed for p in self.parts.values())
        assert not (self.deciding and self.decision is not None)
        assert self.decision is not None or not any(p.acked for p in self.parts.values())

    # ------------------------------------------------------------- helpers
    def _refuse(self, event: TxnEvent, why: str) -> TxnStateError:
        state = self.phase.value + (" (deciding)" if self.deciding else "")
        return TxnStateError(f"transaction {self.txn_id} is {state}: "
                             f"{type(event).__name__} not allowed: {why}")

    def _part(self, event: TxnEvent, agent_id: str, step: Step) -> AgentPart:
        """The part a reply is from; refused unless its command was sent."""
        part = self.parts.get(agent_id)
        if part is None:
            raise self._refuse(event, f"{agent_id!r} is not a member")
        if step not in self.asked:
            raise self._refuse(event, f"no {step.value} was sent")
        return part

    def _moved_on(self) -> bool:
        """The decision is being written or is durable: late replies change nothing."""
        return self.deciding or self.decision is not None

    def _decide(self, decision: Decision, reason: str) -> list[TxnCommand]:
        reason = cut_text(reason, MAX_REASON)  # joined NO votes can be long; an agent's
        self.deciding = True                   # Abort takes at most MAX_REASON
        committed: tuple[str, ...] = ()
        if decision == Decision.COMMIT:
            committed = tuple(a for a in self.agents if self.parts[a].vote)
        return [WriteDecision(decision, reason, committed)]

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

    # --------------------------------------------------------- transitions
    def _on_begin(self, event: Begin) -> list[TxnCommand]:
        if self.started:
            raise self._refuse(event, "already started")
        self.started = True
        if self.quiesced:
            self.asked.add(Step.STAGE)
            return [SendStage(a) for a in self.agents]
        self.asked.add(Step.CUT)
        return [SendCut(a) for a in self.agents]

    def _on_record_loaded(self, event: RecordLoaded) -> list[TxnCommand]:
        if self.started:
            raise self._refuse(event, "already started")
        self.started = self.recovering = True
        return []

    def _on_marked_running(self, event: MarkedRunning) -> list[TxnCommand]:
        if self.phase != TxnPhase.CUTTING or self.decision is not None:
            raise self._refuse(event, "the running marker comes before the decision")
        for p in self.parts.values():
            p.staged = p.cut = p.thawed = True
        self.phase, self.persisted = TxnPhase.RUNNING, True
        return []

    def _on_stage(self, event: StageReplied) -> list[TxnCommand]:
        part = self._part(event, event.agent_id, Step.STAGE)
        if part.staged is not None:
            if part.staged != event.ok:
                raise self._refuse(event, f"{event.agent_id} answered the stage already")
            return []
        part.staged = event.ok
        if self._moved_on():
            return []
        if not event.ok:
            return self._decide(Decision.ABORT,
                                f"cut failed on {event.agent_id}: {event.error}")
        if all(p.staged for p in self.parts.values()):
            self.asked.add(Step.CUT)  # every agent ready: the freeze round is short
            return [SendCut(a) for a in self.agents]
        return []

    def _on_cut(self, event: CutReplied) -> list[TxnCommand]:
        part = self._part(event, event.agent_id, Step.CUT)
        if part.cut is not None:
            if part.cut != event.ok:
                raise self._refuse(event, f"{event.agent_id} answered the cut already")
            return []  # the same reply again: harmless
        if not self._moved_on() and self.phase != TxnPhase.CUTTING:
            raise self._refuse(event, "the cut is over")
        part.cut = event.ok
        if self._moved_on():
            return []  # e.g. another agent's cut failed first
        if not event.ok:
            return self._decide(Decision.ABORT, f"cut failed on {event.agent_id}: {event.error}")
        if not all(p.cut for p in self.parts.values()):
            return []
        if not self.quiesced:  # nothing frozen: nothing to thaw
            for p in self.parts.values():
                p.thawed = True
            self.asked.add(Step.PERSIST)
            return [PersistRunning()]
        self.phase = TxnPhase.THAWING  # every VM frozen at once: the cut is consistent
        self.asked.add(Step.THAW)
        return [SendThaw(a) for a in self.agents]

    def _on_thaw(self, event: ThawReplied) -> list[TxnCommand]:
        part = self._part(event, event.agent_id, Step.THAW)
        thawed = event.ok and not event.on_own
        if part.thawed is not None:
            if part.thawed != thawed:
                raise self._refuse(event, f"{event.agent_id} answered the thaw already")
            return []
        part.thawed = thawed
        if self._moved_on():
            return []
        if not thawed:
            error = "thawed on its own: freeze deadline passed" if event.ok else event.error
            return self._decide(Decision.ABORT, f"thaw on {event.agent_id}: {error}")
        if all(p.thawed for p in self.parts.values()):
            self.asked.add(Step.PERSIST)
            return [PersistRunning()]
        return []

    def _on_persisted(self, event: Persisted) -> list[TxnCommand]:
        if Step.PERSIST not in self.asked:
            raise self._refuse(event, "no running marker was written")
        if self.persisted:
            return []
        self.persisted = True
        if self._moved_on():
            return []
        self.phase = TxnPhase.RUNNING
        self.asked.add(Step.PREPARE)
        return [SendPrepare(a) for a in self.agents]

    def _on_vote(self, event: VoteReplied) -> list[TxnCommand]:
        part = self._part(event, event.agent_id, Step.PREPARE)
        if part.vote is not None:
            if part.vote != event.yes:
                raise self._refuse(event, f"{event.agent_id} voted already")
            return []
        part.vote, part.reason = event.yes, event.reason
        if self._moved_on():
            return []
        if self.grouped and not event.yes:
            return self._decide(Decision.ABORT, f"{event.agent_id} voted NO: {event.reason}")
        if any(p.vote is None for p in self.parts.values()):
            return []
        if any(p.vote for p in self.parts.values()):
            # individual: why each NO, and the disks a YES left out
            notes = [p.reason if p.vote else f"{p.agent_id}: {p.reason}"
                     for p in self.parts.values() if p.reason or not p.vote]
            return self._decide(Decision.COMMIT, "; ".join(notes))
        return self._decide(Decision.ABORT, "every agent voted NO")

    def _on_decision(self, event: DecisionDurable) -> list[TxnCommand]:
        if self.decision is not None:
            if (self.decision, self.committed) != (event.decision, event.committed):
                raise self._refuse(event, f"a second decision {event.decision.value}")
            return []
        if not self.deciding and not self.recovering:
            raise self._refuse(event, "no decision is being written")
        if event.decision == Decision.COMMIT:
            # A durable COMMIT names exactly the agents that voted YES (all, if grouped);
            # replayed, it is the proof of their votes.
            named = [self.parts.get(a) for a in event.committed]
            if any(p is None or not (p.vote or (self.recovering and p.vote is None))
                   for p in named) or (self.grouped and set(event.committed) != set(self.agents)):
                raise self._refuse(event, "a COMMIT of agents that did not all vote YES")
            for p in named:
                if p is not None:
                    p.vote = True
        self.decision, self.reason, self.committed = event.decision, event.reason, event.committed
        self.deciding = False
        self.phase = TxnPhase.DECIDED
        return [] if self.recovering else self._completion()

    def _on_acked(self, event: Acked) -> list[TxnCommand]:
        part = self.parts.get(event.agent_id)
        if part is None or self.decision is None:
            raise self._refuse(event, "nothing to acknowledge")
        if part.acked:
            return []  # acknowledged twice: harmless
        part.acked = True
        if all(p.acked for p in self.parts.values()):
            self.phase = TxnPhase.DONE
            return [Finish()]
        return []

    def _on_abort_request(self, event: CancelRequested | DeadlinePassed) -> list[TxnCommand]:
        if self._moved_on():
            return []  # too late: the decision is being written or is durable
        why = event.reason if isinstance(event, CancelRequested) else "deadline passed"
        return self._decide(Decision.ABORT, why)

    def _on_resumed(self, event: Resumed) -> list[TxnCommand]:
        self.recovering = False
        if self.decision is not None:
            return self._completion()
        if self.phase == TxnPhase.RUNNING:
            self.asked.add(Step.PREPARE)
            return [SendPrepare(a) for a in self.agents]  # re-query: Prepare is idempotent
        return self._decide(Decision.ABORT, "cut abandoned (leader changed or start reply lost)")


_HANDLERS: dict[type[TxnEvent], Callable[[TxnMachine, Any], list[TxnCommand]]] = {
    Begin: TxnMachine._on_begin,
    RecordLoaded: TxnMachine._on_record_loaded,
    MarkedRunning: TxnMachine._on_marked_running,
    StageReplied: TxnMachine._on_stage,
    CutReplied: TxnMachine._on_cut,
    ThawReplied: TxnMachine._on_thaw,
    Persisted: TxnMachine._on_persisted,
    VoteReplied: TxnMachine._on_vote,
    DecisionDurable: TxnMachine._on_decision,
    Acked: TxnMachine._on_acked,
    CancelRequested: TxnMachine._on_abort_request,
    DeadlinePassed: TxnMachine._on_abort_request,
    Resumed: TxnMachine._on_resumed,
}
