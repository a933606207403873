"""The one JSON shape of each object the CLI prints with ``--json``: a transaction, a
backup set, an agent, a restore, a verify. Every command that prints an object of a
kind prints this shape (documented in README.md), whatever RPC it came from."""

from __future__ import annotations

from typing import Any

from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb
from blocktxn.wire import (
    COMPLETION_NAME,
    DECISION_NAME,
    MODE_NAME,
    PHASE_NAME,
    QUIESCE_NAME,
)


def txn_json(t: cpb.Transaction) -> dict[str, Any]:
    """A transaction: ``state`` is committed/aborted once decided, else its phase."""
    out: dict[str, Any] = {
        "txn_id": t.txn_id,
        "state": DECISION_NAME.get(t.decision) or PHASE_NAME.get(t.phase, "?"),
        "phase": PHASE_NAME.get(t.phase, "?"),
        "decision": {cpb.DECISION_COMMIT: "commit", cpb.DECISION_ABORT: "abort"}.get(
            t.decision, ""),
        "reason": t.reason,
        "request_id": t.request_id,
        "completion": COMPLETION_NAME.get(t.completion, "grouped"),
        "quiesce": QUIESCE_NAME.get(t.quiesce, "none"),
        "created_at": t.created_at, "deadline": t.deadline,
        "frozen_from": t.frozen_from, "thawed_at": t.thawed_at,
        "members": [{
            "target": f"{m.agent_id}/{m.vm}/{m.disk}",
            "mode": MODE_NAME.get(m.mode) or "auto", "mode_reason": m.mode_reason,
            "job_status": m.job_status, "bytes": m.bytes_done, "bytes_total": m.bytes_total,
            "outcome": m.outcome} for m in t.members],
        "votes": [{"agent_id": v.agent_id, "yes": v.yes, "reason": v.reason, "at": v.at}
                  for v in t.votes],
        "cut_done_at": t.cut_done_at, "decided_at": t.decided_at, "done_at": t.done_at,
        "committed_agents": list(t.committed_agents),
        "errors": list(t.errors),
    }
    if t.set_id:
        out["set_id"] = t.set_id
    return out


def set_json(s: cpb.BackupSet) -> dict[str, Any]:
    return {
        "set_id": s.set_id, "txn_id": s.txn_id, "cut_at": s.cut_at, "bytes": s.bytes,
        "agents": list(s.agents), "group": s.group, "created_at": s.created_at,
        "images": [{
            "target": f"{i.agent_id}/{i.vm}/{i.disk}", "image": i.image, "backing": i.backing,
            "mode": MODE_NAME.get(i.mode) or "auto", "bytes": i.bytes, "size": i.size,
            "sha256": i.sha256, "cut_at": i.cut_at, "checkpoint": i.checkpoint}
            for i in s.images],
    }


def prune_json(r: cpb.PruneResult) -> dict[str, Any]:
    """A removal: every set considered, kept (with the rules that keep it) or removed."""
    return {"prune_id": r.prune_id, "done": r.done, "sets": [
        {"set_id": v.set_id, "group": v.group, "time": v.time, "keep": v.keep,
         "reasons": list(v.reasons)} for v in r.sets]}


def audit_json(e: cpb.AuditEntry) -> dict[str, Any]:
    return {"at": e.at, "identity": e.identity, "role": e.role or None, "method": e.method,
            "request": e.request, "code": e.code, "detail": e.detail}


def schedule_json(s: cpb.ScheduleInfo) -> dict[str, Any]:
    return {
        "name": s.name, "cron": s.cron, "targets": list(s.targets), "mode": s.mode,
        "quiesce": s.quiesce, "group": s.group, "catch_up": s.catch_up,
        "next_at": s.next_at, "last_at": s.last_at or None,
        "last_outcome": s.last_outcome or None, "last_txn_id": s.last_txn_id or None,
        "last_decision": s.last_decision or None, "last_reason": s.last_reason,
    }


def agent_json(a: cpb.AgentEntry) -> dict[str, Any]:
    return {
        "agent_id": a.agent_id, "address": a.address, "live": a.live, "last_seen": a.last_seen,
        "open_transactions": list(a.inventory.open_transactions),
        "repo_capacity": a.inventory.repo_capacity, "repo_free": a.inventory.repo_free,
        "vms": [{
            "name": v.name, "connected": v.connected, "frozen": v.frozen,
            "has_guest_agent": v.has_guest_agent, "jobs": list(v.jobs),
            "disks": [{
                "name": d.name, "size": d.size, "format": d.format,
                "checkpoint": d.checkpoint, "checkpoint_usable": d.checkpoint_usable,
                "checkpoint_problem": d.checkpoint_problem, "busy_txn": d.busy_txn}
                for d in v.disks]} for v in a.inventory.vms],
    }


def restore_json(r: apb.RestoreResponse) -> dict[str, Any]:
    return {"path": r.path, "bytes": r.bytes}


def verify_json(set_id: str, r: cpb.CoordinatorVerifyResponse) -> dict[str, Any]:
    return {"set_id": set_id, "ok": r.ok,
            "checks": [{"image": c.image, "ok": c.ok, "problem": c.problem} for c in r.checks]}
