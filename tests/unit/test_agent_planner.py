"""The agent's pure planner: full or incremental and why, names, and conflicts."""

from __future__ import annotations

import pytest

from blocktxn.agent.backend import Checkpoint, Disk
from blocktxn.agent.errors import ConflictError, UnknownError
from blocktxn.agent.participant_messages import ImageRecord
from blocktxn.agent.planner import Facts, checkpoint_state, plan_cut
from blocktxn.requests import DiskRequest

LAST = ImageRecord("vm1", "d0", "t0", "images/vm1/d0/t0.qcow2", "", "full", 1, 1 << 20, 1.0,
                   "blocktxn:t0")


def disk(*checkpoints: Checkpoint) -> Disk:
    return Disk("d0", 1 << 20, "qcow2", checkpoints)


def ckpt(name: str = "blocktxn:t0", **kw: bool) -> Checkpoint:
    return Checkpoint(name, kw.get("recording", True), True, kw.get("inconsistent", False))


def facts(d: Disk, last: ImageRecord | None = LAST, exists: bool = True,
          busy: dict[tuple[str, str], str] | None = None,
          frozen: dict[str, str] | None = None) -> Facts:
    return Facts(disks={"vm1": {"d0": d}}, last_image=lambda vm, name: last,
                 image_exists=lambda rel: exists,
                 image_rel=lambda vm, name, s: f"images/{vm}/{name}/{s}.qcow2",
                 busy=busy or {}, frozen=frozen or {})


@pytest.mark.parametrize("d,last,exists,problem", [
    (disk(ckpt()), None, True, "no committed backup yet"),
    (disk(), LAST, True, "checkpoint bitmap missing"),
    (disk(ckpt(inconsistent=True)), LAST, True, "inconsistent"),
    (disk(ckpt(recording=False)), LAST, True, "not recording"),
    (disk(ckpt()), LAST, False, "previous image missing"),
])
def test_an_unusable_checkpoint_makes_auto_full_and_strict_incremental_an_error(
        d: Disk, last: ImageRecord | None, exists: bool, problem: str) -> None:
    assert problem in checkpoint_state(d, last, exists).problem
    plan = plan_cut("t1", [DiskRequest("vm1", "d0")], "none", 0, facts(d, last, exists))
    (m,) = plan.members
    assert (m.mode, m.sync_bitmap, m.backing) == ("full", None, "")
    assert problem in m.mode_reason
    with pytest.raises(ConflictError, match="impossible"):
        plan_cut("t1", [DiskRequest("vm1", "d0", "incremental")], "none", 0,
                 facts(d, last, exists))


def test_a_usable_checkpoint_makes_an_incremental_on_the_previous_image() -> None:
    other = ckpt("foreign")  # not ours: never dropped
    plan = plan_cut("t1", [DiskRequest("vm1", "d0", speed=7)], "freeze", 0,
                    facts(disk(ckpt(), other)))
    (m,) = plan.members
    assert (m.mode, m.sync_bitmap, m.new_bitmap) == ("incremental", "blocktxn:t0", "blocktxn:t1")
    assert m.backing == LAST.image and m.image == "images/vm1/d0/t1.qcow2"
    assert m.stale_bitmaps == ("blocktxn:t0",) and m.speed == 7
    assert m.job_id != m.target_node and len(m.job_id) < 32
    assert plan.freeze_timeout == 10.0  # the default
    full = plan_cut("t1", [DiskRequest("vm1", "d0", "full")], "none", 2.5,
                    facts(disk(ckpt()))).members[0]
    assert (full.mode, full.mode_reason, full.backing) == ("full", "full requested", "")


def test_conflicts_and_unknown_disks_are_refused() -> None:
    f = facts(disk(ckpt()), busy={("vm1", "d0"): "tx"})
    with pytest.raises(ConflictError, match="open transaction tx"):
        plan_cut("t1", [DiskRequest("vm1", "d0")], "none", 0, f)
    with pytest.raises(UnknownError, match="unknown disk"):
        plan_cut("t1", [DiskRequest("vm1", "d9")], "none", 0, f)
    frozen = facts(disk(ckpt()), frozen={"vm1": "tx"})
    with pytest.raises(ConflictError, match="frozen by transaction tx"):
        plan_cut("t1", [DiskRequest("vm1", "d0")], "freeze", 0, frozen)
    assert plan_cut("t1", [DiskRequest("vm1", "d0")], "none", 0, frozen).members
    with pytest.raises(ConflictError, match="already has a bitmap"):
        plan_cut("t1", [DiskRequest("vm1", "d0")], "none", 0, facts(disk(ckpt("blocktxn:t1"))))
