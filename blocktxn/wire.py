"""The API's vocabulary: one table per enum between the names blocktxn uses inside
(requests, records, the CLI) and the proto values. An UNSPECIFIED proto value maps
to "" or to the documented default."""

from __future__ import annotations

from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb

MODE_PB = {"auto": apb.BACKUP_MODE_AUTO, "full": apb.BACKUP_MODE_FULL,
           "incremental": apb.BACKUP_MODE_INCREMENTAL}
#: "" for UNSPECIFIED: the request's (or the agent's) default applies
MODE_NAME = {apb.BACKUP_MODE_UNSPECIFIED: "", **{v: k for k, v in MODE_PB.items()}}
MODES = tuple(MODE_PB)

QUIESCE_PB = {"none": apb.QUIESCE_NONE, "freeze": apb.QUIESCE_FREEZE,
              "pause": apb.QUIESCE_PAUSE}
QUIESCE_NAME = {apb.QUIESCE_UNSPECIFIED: "none", **{v: k for k, v in QUIESCE_PB.items()}}
QUIESCES = tuple(QUIESCE_PB)

COMPLETION_PB = {"grouped": cpb.COMPLETION_GROUPED, "individual": cpb.COMPLETION_INDIVIDUAL}
COMPLETION_NAME = {cpb.COMPLETION_UNSPECIFIED: "grouped",
                   **{v: k for k, v in COMPLETION_PB.items()}}
COMPLETIONS = tuple(COMPLETION_PB)

PHASE_PB = {"cutting": cpb.TXN_PHASE_CUTTING, "thawing": cpb.TXN_PHASE_THAWING,
            "running": cpb.TXN_PHASE_RUNNING, "decided": cpb.TXN_PHASE_DECIDED,
            "done": cpb.TXN_PHASE_DONE}
PHASE_NAME = {cpb.TXN_PHASE_UNSPECIFIED: "?", **{v: k for k, v in PHASE_PB.items()}}

DECISION_PB = {"": cpb.DECISION_NONE, "commit": cpb.DECISION_COMMIT,
               "abort": cpb.DECISION_ABORT}
