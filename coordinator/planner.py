"""What a backup request becomes: its members (every disk it names, on a live agent,
in a connected VM, in no other open transaction), their agents' addresses, and the
new transaction record. Pure: the caller reads the agent entries and open
transactions and passes them in."""

from __future__ import annotations

import time
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass

from blocktxn.requests import DEFAULT_DEADLINE, DEFAULT_FREEZE_TIMEOUT, BackupRequest

from .errors import NotFoundError, PreconditionError, RequestError
from .records import AgentEntry, MemberRecord, TxnRecord


@dataclass(frozen=True)
class Plan:
    members: tuple[MemberRecord, ...]
    agents: tuple[tuple[str, str], ...]  # (agent id, address) of every member agent, sorted


def plan(request: BackupRequest, entries: Iterable[AgentEntry], live: Container[str],
         busy: Mapping[tuple[str, str, str], str]) -> Plan:
    """The members *request* names, given the registered agents, the live ones, and
    the disks held by open transactions (disk -> txn id).

    Raises:
        InvalidInput: a malformed request (RequestError: a disk named twice).
        NotFoundError: an unknown agent, VM or disk.
        PreconditionError: a lost agent or VM, a VM without disks, a busy disk.
    """
    targets = request.check()
    agents = {e.agent_id: e for e in entries}
    members: list[MemberRecord] = []
    seen: set[tuple[str, str, str]] = set()
    for target, mode in targets:
        agent_id, vm_name = target.agent_id, target.vm
        entry = agents.get(agent_id)
        if entry is None:
            raise NotFoundError(f"unknown agent {agent_id!r}")
        if agent_id not in live:
            raise PreconditionError(f"agent {agent_id} is lost (no heartbeat)")
        vm = entry.inventory.vm(vm_name)
        if vm is None:
            raise NotFoundError(f"unknown VM {vm_name!r} on agent {agent_id}")
        if not vm.connected:
            raise PreconditionError(f"VM {vm_name} on agent {agent_id} is lost "
                                    "(QEMU unreachable)")
        disks = [d.name for d in vm.disks]
        if not disks:
            raise PreconditionError(f"VM {vm_name} on agent {agent_id} has no disk")
        for disk in [target.disk] if target.disk else disks:
            if disk not in disks:
                raise NotFoundError(f"unknown disk {disk!r} on {agent_id}/{vm_name}")
            key = (agent_id, vm_name, disk)
            if key in seen:
                raise RequestError(f"disk {'/'.join(key)} is named twice")
            if key in busy:
                raise PreconditionError(f"disk {'/'.join(key)} is in open transaction "
                                        f"{busy[key]}")
            seen.add(key)
            members.append(MemberRecord(agent_id, vm_name, disk, mode))
    if not members:
        raise RequestError("the targets name no disk")
    return Plan(tuple(members),
                tuple(sorted((a, agents[a].address) for a in {m.agent_id for m in members})))


def txn_id_at(now: float, salt: int) -> str:
    """A transaction id: its start time (UTC) and 24 bits of *salt*."""
    return time.strftime("tx-%Y%m%d-%H%M%S-", time.gmtime(now)) + f"{salt & 0xFFFFFF:06x}"


def new_record(request: BackupRequest, planned: Plan, txn_id: str, request_id: str,
               now: float, leader: str) -> TxnRecord:
    """The record of a new transaction (the defaults of the options applied)."""
    o = request.options
    return TxnRecord(
        txn_id=txn_id, request_id=request_id, completion=o.completion, quiesce=o.quiesce,
        freeze_timeout=o.freeze_timeout or DEFAULT_FREEZE_TIMEOUT,
        deadline=now + (o.deadline or DEFAULT_DEADLINE), speed=o.speed, created_at=now,
        members=planned.members, agents=planned.agents, leader=leader, group=o.group)
