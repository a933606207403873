"""Errors of the agent; each class is also one of the shared kinds in
``blocktxn.errors``, whose one table gives its gRPC status code.

AgentError
 +-- BadRequestError        malformed request or identifier  (InvalidInput) -> INVALID_ARGUMENT
 +-- UnknownError           unknown VM, disk, txn or set      (NotFound)     -> NOT_FOUND
 +-- ConflictError          conflicts with the current state  (Conflict)     -> FAILED_PRECONDITION
 |    +-- StateError        an event the participant machine does not allow now
 +-- QemuError              the hypervisor refused or failed  (Conflict)     -> FAILED_PRECONDITION
 |    +-- VmLostError       the VM's control socket is gone   (Unavailable)  -> UNAVAILABLE
 |    +-- FreezeRefusedError  no quiesce was attempted (no working watchdog)
 +-- AgentTimeoutError      QEMU or a guest did not answer    (DeadlineExceeded)
 +-- JournalError           a corrupt journal or catalog record: the agent stops

Validation shared with the client and coordinator (``blocktxn.requests``,
``blocktxn.ids``) raises ``blocktxn.errors.InvalidInput`` itself.
"""

from __future__ import annotations

from blocktxn.errors import (
    BlocktxnError,
    Conflict,
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    Unavailable,
)


class AgentError(BlocktxnError):
    """Root of every error the agent reports to its callers."""


class BadRequestError(AgentError, InvalidInput):
    """The request is malformed: nothing was changed."""


class UnknownError(AgentError, NotFound):
    """A VM, disk, transaction or backup set that this agent does not have."""


class ConflictError(AgentError, Conflict):
    """The request conflicts with the current state: nothing was changed."""


class QemuError(AgentError, Conflict):
    """The hypervisor (QEMU, a guest agent, a QEMU tool) refused or failed a command."""


class VmLostError(QemuError, Unavailable):
    """The VM's control connection is gone."""


class FreezeRefusedError(QemuError):
    """The guest was NOT quiesced: refused before anything reached it (its freeze
    watchdog is missing, wedged or busy). Its freeze state is not this agent's."""


class AgentTimeoutError(AgentError, DeadlineExceeded):
    """QEMU or a guest agent did not answer within its deadline."""


class JournalError(AgentError):
    """The journal or the catalog cannot be read back (a corrupt record before the
    end): the agent stops rather than guess what it promised."""
