"""The agent's planner: pure decisions of a cut, no I/O.

From what the runner gathered (each VM's disks and checkpoints, the catalog's last
image of each disk, which disks and VMs other transactions hold), decide for every
member: full or incremental and why, which checkpoint it copies from, the new
checkpoint, the names of its job and target, and its image and backing file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from blocktxn.requests import DEFAULT_FREEZE_TIMEOUT, DiskRequest

from .backend import CHECKPOINT_PREFIX, NODE_PREFIX, Disk
from .errors import ConflictError, UnknownError
from .participant_messages import ImageRecord, MemberPlan, TxnPlan


def short_name(*parts: str) -> str:
    """A job/node name (< 32 chars, as QMP wants) unique to *parts*."""
    return NODE_PREFIX + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class CheckpointState:
    """Can the next backup of a disk be incremental, and from which checkpoint?"""

    checkpoint: str  # the last committed backup's checkpoint ("" if none)
    usable: bool
    problem: str


def checkpoint_state(disk: Disk, last: ImageRecord | None, image_exists: bool
                     ) -> CheckpointState:
    """Whether *disk*'s last committed checkpoint still holds every write since."""
    if last is None:
        return CheckpointState("", False, "no committed backup yet")
    ckpt = disk.checkpoint(last.checkpoint)
    if ckpt is None:
        problem = "checkpoint bitmap missing (QEMU restarted uncleanly?)"
    elif ckpt.inconsistent:
        problem = "checkpoint bitmap inconsistent (unclean shutdown)"
    elif not ckpt.recording:
        problem = "checkpoint bitmap not recording"
    elif not image_exists:
        problem = "previous image missing from the repository"
    else:
        return CheckpointState(last.checkpoint, True, "")
    return CheckpointState(last.checkpoint, False, problem)


def estimate(disk: Disk, member: MemberPlan) -> int:
    """Bytes the member's image will take at most: what the job copies (the dirty bytes
    of its checkpoint, or every allocated byte for a full) plus qcow2 metadata."""
    ckpt = disk.checkpoint(member.sync_bitmap) if member.sync_bitmap else None
    data = ckpt.count if ckpt is not None else disk.allocated
    return data + data // 50 + (1 << 20)


def choose_mode(requested: str, state: CheckpointState, what: str) -> tuple[str, str]:
    """(mode, reason) for one disk: incremental when its checkpoint is usable.

    Raises:
        ConflictError: incremental was required and is impossible.
    """
    if requested == "full":
        return "full", "full requested"
    if state.usable:
        return "incremental", f"checkpoint {state.checkpoint} is usable"
    if requested == "incremental":
        raise ConflictError(f"incremental backup of {what} impossible: {state.problem}")
    return "full", state.problem


@dataclass(frozen=True)
class Facts:
    """What the planner needs to know about this host right now."""

    disks: Mapping[str, Mapping[str, Disk]]  # vm -> disk name -> disk (member VMs only)
    last_image: Callable[[str, str], ImageRecord | None]  # (vm, disk) -> last committed
    image_exists: Callable[[str], bool]  # repository-relative image -> exists
    image_rel: Callable[[str, str, str], str]  # (vm, disk, set id) -> repository path
    busy: Mapping[tuple[str, str], str]  # (vm, disk) -> open transaction holding it
    frozen: Mapping[str, str]  # vm -> transaction holding it quiesced
    pruning: Mapping[tuple[str, str], str] = field(default_factory=dict)  # -> set removed
    chain_length: Callable[[str, str], int] = lambda vm, disk: 0  # images of the newest chain
    max_chain: int = 0  # 0: no limit
    repo_free: int | None = None  # bytes free in the repository (None: not checked)


def plan_cut(txn_id: str, disks: Sequence[DiskRequest], quiesce: str, freeze_timeout: float,
             facts: Facts, individual: bool = False) -> TxnPlan:
    """The plan of a cut (request already validated).

    Raises:
        UnknownError: a disk the VM does not have.
        ConflictError: a disk or VM another transaction holds, an impossible incremental,
            or a leftover checkpoint of this transaction id.
    """
    plans = []
    for d in disks:
        disk = facts.disks[d.vm].get(d.disk)
        if disk is None:
            raise UnknownError(f"unknown disk {d.disk!r} on VM {d.vm}")
        if (d.vm, d.disk) in facts.busy:
            raise ConflictError(
                f"disk {d.vm}/{d.disk} is in open transaction {facts.busy[(d.vm, d.disk)]}")
        if (d.vm, d.disk) in facts.pruning:
            raise ConflictError(f"disk {d.vm}/{d.disk} is being pruned (backup set "
                                f"{facts.pruning[(d.vm, d.disk)]} is being removed): retry")
        last = facts.last_image(d.vm, d.disk)
        state = checkpoint_state(disk, last, last is not None and facts.image_exists(last.image))
        length = facts.chain_length(d.vm, d.disk) if state.usable else 0
        if facts.max_chain and length >= facts.max_chain:
            state = replace(state, usable=False, problem=(
                f"the chain has {length} images (--max-chain {facts.max_chain})"))
        mode, reason = choose_mode(d.mode, state, f"{d.vm}/{d.disk}")
        new_checkpoint = CHECKPOINT_PREFIX + txn_id
        if disk.checkpoint(new_checkpoint) is not None:
            raise ConflictError(f"{d.vm}/{d.disk} already has a bitmap {new_checkpoint}")
        plans.append(MemberPlan(
            vm=d.vm, disk=d.disk, mode=mode, mode_reason=reason,
            new_bitmap=new_checkpoint,
            sync_bitmap=state.checkpoint if mode == "incremental" else None,
            stale_bitmaps=tuple(c.name for c in disk.checkpoints
                                if c.name.startswith(CHECKPOINT_PREFIX)),
            job_id=short_name(txn_id, d.vm, d.disk, "job"),
            target_node=short_name(txn_id, d.vm, d.disk, "target"),
            image=facts.image_rel(d.vm, d.disk, txn_id),
            backing=last.image if mode == "incremental" and last else "",
            size=disk.size, speed=d.speed,
        ))
    if facts.repo_free is not None:
        need = sum(estimate(facts.disks[p.vm][p.disk], p) for p in plans)
        if need > facts.repo_free:
            raise ConflictError(
                f"repository full: this backup needs about {need >> 20} MiB, "
                f"{facts.repo_free >> 20} MiB free (prune old backup sets)")
    if quiesce != "none":  # a freeze is VM-wide: one transaction at a time
        for vm in facts.disks:
            if vm in facts.frozen:
                raise ConflictError(f"VM {vm} is frozen by transaction {facts.frozen[vm]}")
    return TxnPlan(txn_id, tuple(plans), quiesce, freeze_timeout or DEFAULT_FREEZE_TIMEOUT,
                   individual)
