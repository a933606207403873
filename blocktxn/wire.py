"""The API's vocabulary at the gRPC edges: one table per enum between the names
blocktxn uses inside (requests, records, the CLI) and the proto values, and the
conversion of a backup request. An UNSPECIFIED proto value maps to "" or to the
documented default; a value the table does not know is InvalidInput."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from blocktxn.errors import InvalidInput
from blocktxn.requests import BackupOptions, BackupRequest, DiskRequest
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb

K = TypeVar("K")

MODE_PB = {"auto": apb.BACKUP_MODE_AUTO, "full": apb.BACKUP_MODE_FULL,
           "incremental": apb.BACKUP_MODE_INCREMENTAL}
#: "" for UNSPECIFIED: the request's (or the agent's) default applies
MODE_NAME = {apb.BACKUP_MODE_UNSPECIFIED: "", **{v: k for k, v in MODE_PB.items()}}

QUIESCE_PB = {"none": apb.QUIESCE_NONE, "freeze": apb.QUIESCE_FREEZE,
              "pause": apb.QUIESCE_PAUSE}
QUIESCE_NAME = {apb.QUIESCE_UNSPECIFIED: "none", **{v: k for k, v in QUIESCE_PB.items()}}

COMPLETION_PB = {"grouped": cpb.COMPLETION_GROUPED, "individual": cpb.COMPLETION_INDIVIDUAL}
COMPLETION_NAME = {cpb.COMPLETION_UNSPECIFIED: "grouped",
                   **{v: k for k, v in COMPLETION_PB.items()}}

PHASE_PB = {"cutting": cpb.TXN_PHASE_CUTTING, "thawing": cpb.TXN_PHASE_THAWING,
            "running": cpb.TXN_PHASE_RUNNING, "decided": cpb.TXN_PHASE_DECIDED,
            "done": cpb.TXN_PHASE_DONE}
PHASE_NAME = {cpb.TXN_PHASE_UNSPECIFIED: "?", **{v: k for k, v in PHASE_PB.items()}}

DECISION_PB = {"": cpb.DECISION_NONE, "commit": cpb.DECISION_COMMIT,
               "abort": cpb.DECISION_ABORT}
#: as the CLI and the client report a transaction
DECISION_NAME = {cpb.DECISION_NONE: "", cpb.DECISION_COMMIT: "committed",
                 cpb.DECISION_ABORT: "aborted"}


def name_of(table: Mapping[K, str], value: K, what: str) -> str:
    """Look *value* up in a *_NAME table.

    Raises:
        InvalidInput: the proto value is not one this version knows.
    """
    if value not in table:
        raise InvalidInput(f"unknown {what} {value}")
    return table[value]


def backup_request_to_pb(req: BackupRequest) -> cpb.StartTransactionRequest:
    o = req.options
    return cpb.StartTransactionRequest(
        request_id=o.request_id,
        targets=[cpb.Target(target=t, mode=MODE_PB[m] if m else apb.BACKUP_MODE_UNSPECIFIED)
                 for t, m in req.targets],
        mode=MODE_PB[o.mode], completion=COMPLETION_PB[o.completion],
        quiesce=QUIESCE_PB[o.quiesce], freeze_timeout_s=o.freeze_timeout,
        deadline_s=o.deadline, speed=o.speed, group=o.group)


def backup_request_from_pb(msg: cpb.StartTransactionRequest) -> BackupRequest:
    """Raises: InvalidInput for an enum value this version does not know."""
    return BackupRequest(
        targets=tuple((t.target, name_of(MODE_NAME, t.mode, "target mode"))
                      for t in msg.targets),
        options=BackupOptions(
            mode=name_of(MODE_NAME, msg.mode, "mode") or "auto",
            completion=name_of(COMPLETION_NAME, msg.completion, "completion"),
            quiesce=name_of(QUIESCE_NAME, msg.quiesce, "quiesce"),
            freeze_timeout=msg.freeze_timeout_s, deadline=msg.deadline_s, speed=msg.speed,
            request_id=msg.request_id, group=msg.group))


def disk_requests_to_pb(disks: list[DiskRequest]) -> list[apb.CutMember]:
    return [apb.CutMember(vm=d.vm, disk=d.disk, mode=MODE_PB[d.mode], speed=d.speed)
            for d in disks]


def disk_requests_from_pb(members: list[apb.CutMember]) -> list[DiskRequest]:
    """Raises: InvalidInput for an unknown mode."""
    return [DiskRequest(m.vm, m.disk, name_of(MODE_NAME, m.mode, "backup mode") or "auto",
                        m.speed) for m in members]
