"""Errors of the coordinator.

CoordinatorError
 +-- RequestError            malformed request        -> INVALID_ARGUMENT
 +-- NotFoundError           unknown agent/VM/disk/txn -> NOT_FOUND
 +-- PreconditionError       conflicts with the state  -> FAILED_PRECONDITION
 +-- NotLeaderError          fenced write rejected     -> UNAVAILABLE
 +-- StoreUnavailableError   etcd unreachable          -> UNAVAILABLE
 +-- AgentCallError          an agent RPC failed (kept: the gRPC code, retryable or not)

``service.py`` holds the one table from these to gRPC status codes.
"""

from __future__ import annotations

import grpc


class CoordinatorError(Exception):
    """Root of the coordinator's errors."""


class RequestError(CoordinatorError):
    pass


class NotFoundError(CoordinatorError):
    pass


class PreconditionError(CoordinatorError):
    pass


class NotLeaderError(CoordinatorError):
    pass


class StoreUnavailableError(CoordinatorError):
    pass


RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED})


class AgentCallError(CoordinatorError):
    """An agent call failed; ``retryable`` for transport-level failures only."""

    def __init__(self, agent_id: str, method: str, code: grpc.StatusCode, details: str) -> None:
        self.agent_id, self.method, self.code, self.details = agent_id, method, code, details
        super().__init__(f"{agent_id}.{method}: {code.name}: {details}")

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE
