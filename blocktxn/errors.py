"""The kinds of error every blocktxn component reports, and the one table from them
to gRPC status codes.

Each daemon has its own error tree (``blocktxn.agent.errors``,
``blocktxn.coordinator.errors``); every class in it also derives from one kind
here, so both services map errors to status codes through the same table::

    BlocktxnError
     +-- InvalidInput   malformed request or identifier   -> INVALID_ARGUMENT
     +-- NotFound       unknown agent, VM, disk, txn, set  -> NOT_FOUND
     +-- Conflict       conflicts with the current state   -> FAILED_PRECONDITION
     +-- Unavailable    a peer (QEMU, etcd, leader) is gone -> UNAVAILABLE
     +-- DeadlineExceeded  a peer did not answer in time   -> DEADLINE_EXCEEDED

An error that carries a gRPC code of its own (``status`` attribute, e.g. a failed
call to an agent, passed on) keeps it.
"""

from __future__ import annotations

import grpc


class BlocktxnError(Exception):
    """Root of every error a blocktxn component reports to its callers."""

    #: Set by errors that pass on another service's status (e.g. a failed agent call).
    status: grpc.StatusCode | None = None


class InvalidInput(BlocktxnError):
    """The request is malformed: nothing was changed."""


class NotFound(BlocktxnError):
    """Something the request names does not exist."""


class Conflict(BlocktxnError):
    """The request conflicts with the current state (nothing was changed, or a failed
    step was rolled back)."""


class Unavailable(BlocktxnError):
    """A peer is unreachable: QEMU, etcd, or the leader."""


class DeadlineExceeded(BlocktxnError):
    """A peer did not answer within its deadline."""


#: The one table from error kinds to gRPC status codes (most specific first).
STATUS_OF: tuple[tuple[type[BlocktxnError], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def status_code(err: BlocktxnError) -> grpc.StatusCode:
    """The gRPC status code that reports *err* (INTERNAL for an unclassified error)."""
    if err.status is not None:
        return err.status
    for cls, code in STATUS_OF:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL
