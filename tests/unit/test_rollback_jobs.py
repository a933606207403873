"""A rollback that meets a job already gone (its barrier dismissed it in the same
instant: an Abort overlapping a Prepare) still cancels the other jobs and deletes every
target node: found by the soak run, where such a rollback stopped at "Job not found"
and left a ``btx`` node in QEMU that nothing owned."""

from __future__ import annotations

import asyncio
from typing import Any

from blocktxn.agent.backend import JobProgress
from blocktxn.agent.errors import QemuError
from blocktxn.agent.participant_messages import MemberPlan
from blocktxn.agent.qemu import blockjobs


def member(disk: str) -> MemberPlan:
    return MemberPlan(vm="vm1", disk=disk, mode="full", mode_reason="", new_bitmap="b",
                      sync_bitmap=None, stale_bitmaps=(), job_id=f"btxjob{disk}",
                      target_node=f"btxnode{disk}", image=f"{disk}.qcow2", backing="",
                      size=1, speed=0)


class QemuSide:
    """Jobs and nodes as QEMU has them; the agent's view still lists job d0, which the
    barrier dismissed a moment ago."""

    name = "vm1"
    connected = True

    def __init__(self) -> None:
        self.jobs = {"btxjobd0": "pending", "btxjobd1": "running"}  # what QEMU has
        del self.jobs["btxjobd0"]                                   # dismissed just now
        self.nodes = {"btxnoded0", "btxnoded1", "disk-d0", "disk-d1"}

    async def refresh_jobs(self) -> dict[str, JobProgress]:
        # the reply still on its way when the barrier dismissed d0's job
        return {"btxjobd0": JobProgress("btxjobd0", "pending"),
                "btxjobd1": JobProgress("btxjobd1", "running")}

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        assert args is not None
        if cmd in ("job-cancel", "job-dismiss"):
            if args["id"] not in self.jobs:
                raise QemuError(f"vm1: {cmd}: Job '{args['id']}' not found")
            if cmd == "job-cancel":
                self.jobs[args["id"]] = "concluded"
            else:
                del self.jobs[args["id"]]
        elif cmd == "blockdev-del":
            if any(n.endswith(args["node-name"][-2:]) for n in self.jobs):
                raise QemuError("vm1: blockdev-del: node is in use")
            self.nodes.discard(args["node-name"])
        return {}

    async def wait_job(self, job_id: str, statuses: set[str], timeout: float | None
                       ) -> JobProgress:
        return JobProgress(job_id, self.jobs.get(job_id, "null"))

    async def node_names(self) -> set[str]:
        return set(self.nodes)


def test_a_job_already_gone_does_not_stop_the_rollback_of_the_others() -> None:
    qemu = QemuSide()
    asyncio.run(blockjobs.cancel_jobs(qemu, [member("d0"), member("d1")]))  # type: ignore[arg-type]
    assert qemu.jobs == {}
    assert qemu.nodes == {"disk-d0", "disk-d1"}


class SweptSide(QemuSide):
    """As QemuSide, but only the first listing is stale (later ones see QEMU as it is);
    no disk holds a checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.listings = 0

    async def refresh_jobs(self) -> dict[str, JobProgress]:
        self.listings += 1
        if self.listings == 1:
            return await super().refresh_jobs()
        return {j: JobProgress(j, s) for j, s in self.jobs.items()}

    async def disks(self) -> dict[str, Any]:
        return {}


def test_a_sweep_that_meets_a_job_ended_meanwhile_removes_the_other_leftovers() -> None:
    """Found by the scale run: a sweep after a transaction listed a job that its own
    rollback dismissed an instant later, and stopped at "Job not found" (a warning on
    every agent, and the leftovers after it were left)."""
    qemu = SweptSide()
    gone = asyncio.run(blockjobs.sweep(qemu, set(), set(), {}))  # type: ignore[arg-type]
    assert qemu.jobs == {}
    assert qemu.nodes == {"disk-d0", "disk-d1"}
    assert "job btxjobd1" in gone and "job btxjobd0" not in gone
