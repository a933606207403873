"""Errors of the agent.

AgentError
 +-- BadRequestError        malformed request or identifier  -> INVALID_ARGUMENT
 +-- UnknownError           unknown VM, disk, txn or set      -> NOT_FOUND
 +-- ConflictError          conflicts with the current state  -> FAILED_PRECONDITION
 +-- QemuError              QEMU refused or failed a command  -> FAILED_PRECONDITION
 |    +-- VmLostError       the VM's QMP socket is gone       -> UNAVAILABLE
 +-- TimeoutError_          QEMU or a guest did not answer    -> DEADLINE_EXCEEDED

``service.py`` holds the one table from these to gRPC status codes.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error the agent reports to its callers."""


class BadRequestError(AgentError):
    """The request is malformed: nothing was changed."""


class UnknownError(AgentError):
    """A VM, disk, transaction or backup set that this agent does not have."""


class ConflictError(AgentError):
    """The request conflicts with the current state: nothing was changed."""


class QemuError(AgentError):
    """QEMU (or a guest agent) refused or failed a command."""


class VmLostError(QemuError):
    """The VM's QMP connection is gone."""


class AgentTimeoutError(AgentError):
    """QEMU or a guest agent did not answer within its deadline."""
