"""Who may call which coordinator method, and the audit trail of mutating calls.

Roles: ``reader`` lists and shows (transactions, sets, agents, schedules, the audit
trail) and verifies; ``operator`` also backs up, cancels, restores, prunes and forgets;
``agent`` registers (only under its own id: the certificate's identity) and asks for
decisions; ``coordinator`` (the other replicas, forwarding calls) may call anything.
Every call of an audited method is written to etcd when it ends, with the caller's
identity and the outcome; a write that fails is logged and does not fail the call."""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
from google.protobuf import json_format

from blocktxn.access import AccessInterceptor, RoleMap
from blocktxn.requests import cut_text

from .errors import StoreRejectedError, StoreUnavailableError
from .records import AuditRecord
from .store import Store

log = logging.getLogger(__name__)

SERVICE = "blocktxn.v1.CoordinatorService"
READ = ("ListAgents", "GetTransaction", "ListTransactions", "WatchTransaction",
        "ListBackupSets", "GetBackupSet", "Verify", "ListSchedules", "ListAudit")
OPERATE = ("StartTransaction", "CancelTransaction", "Restore", "ForgetSets", "PruneSets")
AGENT = ("RegisterAgent", "QueryDecision")
AUDITED = frozenset(OPERATE)
MAX_AUDIT_TEXT = 1024
DEFAULT_KEEP = 90 * 86400.0
MAX_RECORDS = 100_000
DENIED_PER_MINUTE = 10   # denied calls recorded per identity and minute
MAX_IDENTITIES = 1000    # identities whose denied calls are counted


def allowed() -> dict[str, frozenset[str]]:
    table: dict[str, set[str]] = {}
    for names, roles in ((READ, {"reader", "operator"}), (OPERATE, {"operator"}),
                         (AGENT, {"agent"})):
        for name in names:
            table.setdefault(name, set()).update(roles | {"coordinator"})
    return {name: frozenset(roles) for name, roles in table.items()}


def _own_id(method: str, identity: str, request: Any) -> str:
    if method == "RegisterAgent" and request.agent_id != identity:
        return f"may register only as agent {identity!r}, not {request.agent_id!r}"
    return ""


class Auditor:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._denied: dict[str, tuple[float, int]] = {}  # identity -> (minute, count)

    def _quiet(self, identity: str) -> bool:
        """True past DENIED_PER_MINUTE denied calls of *identity* in this minute (a
        client looping on a refused call must not fill etcd)."""
        minute = time.time() // 60
        start, count = self._denied.get(identity, (minute, 0))
        count = count + 1 if start == minute else 1
        self._denied.pop(identity, None)
        self._denied[identity] = (minute, count)
        while len(self._denied) > MAX_IDENTITIES:
            self._denied.pop(next(iter(self._denied)))
        if count == DENIED_PER_MINUTE + 1:
            log.warning("audit: more than %d denied calls by %s this minute: the rest of "
                        "this minute is not recorded", DENIED_PER_MINUTE, identity)
        return count > DENIED_PER_MINUTE

    async def record(self, method: str, identity: str, role: str, request: Any,
                     code: grpc.StatusCode, detail: str) -> None:
        if code == grpc.StatusCode.PERMISSION_DENIED and self._quiet(identity):
            return
        text = json_format.MessageToJson(request, indent=None, sort_keys=True)
        entry = AuditRecord(time.time(), identity, role, method,
                            cut_text(text, MAX_AUDIT_TEXT), code.name,
                            cut_text(detail, MAX_AUDIT_TEXT))
        try:
            await self.store.put_audit(entry)
        except (StoreUnavailableError, StoreRejectedError) as err:
            log.error("audit record lost (%s by %s: %s): %s", method, identity, code.name, err)

    def interceptor(self, roles: RoleMap) -> AccessInterceptor:
        return AccessInterceptor(SERVICE, allowed(), roles, _own_id, AUDITED, self.record)
