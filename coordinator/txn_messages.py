"""The vocabulary of the transaction machine: the phases and decisions it knows, the
events it is told (replies, requests, replayed durable facts) and the commands it
gives (RPCs to agents, durable writes)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


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


# -------------------------------------------------------------------- events
@dataclass(frozen=True)
class TxnEvent:
    pass


@dataclass(frozen=True)
class Begin(TxnEvent):
    """A new transaction: its record is durable."""


@dataclass(frozen=True)
class StageReplied(TxnEvent):
    """An agent staged its part of the cut (targets ready, nothing frozen)."""

    agent_id: str
    ok: bool
    error: str = ""


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
    on_own: bool = False  # the agent had thawed already: its freeze deadline passed


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
    """The durable decision: the answer to WriteDecision, or replayed from etcd."""

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
class RecordLoaded(TxnEvent):
    """Replay: a new leader found the transaction's durable record."""


@dataclass(frozen=True)
class MarkedRunning(TxnEvent):
    """Replay: the durable record is RUNNING (every agent cut and thawed)."""


@dataclass(frozen=True)
class Resumed(TxnEvent):
    """Replay is over: the new leader drives the transaction from here."""


# ------------------------------------------------------------------ commands
@dataclass(frozen=True)
class TxnCommand:
    pass


@dataclass(frozen=True)
class SendStage(TxnCommand):
    agent_id: str


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
