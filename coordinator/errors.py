"""Errors of the coordinator: every exception it raises is one of these.

CoordinatorError (BlocktxnError)
 +-- RequestError            malformed request          (InvalidInput -> INVALID_ARGUMENT)
 +-- NotFoundError           unknown agent/VM/disk/txn   (NotFound -> NOT_FOUND)
 +-- PreconditionError       conflicts with the state    (Conflict -> FAILED_PRECONDITION)
 +-- NotLeaderError          fenced write rejected       (Unavailable -> UNAVAILABLE)
 +-- StoreUnavailableError   etcd unreachable            (Unavailable -> UNAVAILABLE)
 |    +-- StoreFullError      etcd's NOSPACE alarm: writes refused until an operator frees space
 +-- StoreRejectedError      etcd refused for good, e.g. too large (Conflict)
 +-- StoreCorruptError       a stored value is malformed (-> INTERNAL)
 +-- ConfigError             a bad configuration value   (InvalidInput, ValueError)
 +-- AgentCallError          an agent RPC failed         (keeps the agent's gRPC code)
 +-- TxnStateError           an event the transaction machine refuses (a runner bug)

Identifiers are checked by ``blocktxn.ids.check_id``, whose ``IdentifierError`` is
an ``InvalidInput`` already. The one table from kinds to gRPC status codes is
``blocktxn.errors.STATUS_OF``.
"""

from __future__ import annotations

import grpc

from blocktxn.errors import BlocktxnError, Conflict, InvalidInput, NotFound, Unavailable


class CoordinatorError(BlocktxnError):
    """Root of the coordinator's errors."""


class RequestError(CoordinatorError, InvalidInput):
    """The request is malformed: nothing was changed."""


class NotFoundError(CoordinatorError, NotFound):
    """An agent, VM, disk, transaction or backup set that does not exist."""


class PreconditionError(CoordinatorError, Conflict):
    """The request conflicts with the current state: nothing was changed."""


class NotLeaderError(CoordinatorError, Unavailable):
    """This replica does not lead (any more): its fenced writes are rejected."""


class StoreUnavailableError(CoordinatorError, Unavailable):
    """etcd did not answer within the deadline."""


class StoreFullError(StoreUnavailableError):
    """etcd is full (its NOSPACE alarm): it refuses writes until an operator compacts,
    defragments and disarms it; retried like an outage, with backoff."""


class StoreRejectedError(CoordinatorError, Conflict):
    """etcd refused the request for good (too large, invalid, not allowed): retrying
    cannot help."""


class StoreCorruptError(CoordinatorError):
    """A value read from etcd is not a record this version can read."""


class ConfigError(CoordinatorError, InvalidInput, ValueError):
    """A bad configuration value (a ValueError too, like ``IdentifierError``)."""


class TxnStateError(CoordinatorError):
    """An event that the transaction machine does not allow in its current state."""


RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED})


class AgentCallError(CoordinatorError):
    """An agent call failed. Passed on to clients with the agent's status code and
    details (its ``str``); ``describe()`` names the agent and call for logs and records.
    ``retryable`` for transport-level failures only."""

    def __init__(self, agent_id: str, method: str, code: grpc.StatusCode, details: str) -> None:
        self.agent_id, self.method, self.code, self.details = agent_id, method, code, details
        self.status = code
        super().__init__(details or f"{agent_id}.{method}: {code.name}")

    def describe(self) -> str:
        return f"{self.agent_id}.{self.method}: {self.code.name}: {self.details}"

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE
