"""The agent's Status view of a transaction's jobs: a job the backend adopted after a
restart (libvirt: the domain's backup job, picked up again with no per-disk totals)
still shows the bytes the cut said it copies, and all of them once it has copied."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

from blocktxn.agent.backend import JobProgress
from blocktxn.agent.participant import TxnState
from blocktxn.agent.participant_messages import MemberPlan, Phase, TxnPlan
from blocktxn.agent.views import progress


class Adopted:
    """A backend whose job lost its per-disk totals (as after an adoption)."""

    connected = True

    def __init__(self, status: str) -> None:
        self.status = status

    async def progress(self) -> Mapping[str, JobProgress]:
        return {"j0": JobProgress("j0", self.status), "j1": JobProgress("j1", self.status)}


def member(disk: str, job: str) -> MemberPlan:
    return MemberPlan("vm1", disk, "incremental", "", "b2", "b1", (), job, f"t-{disk}",
                      f"vm1/{disk}.qcow2", "", 1 << 20, 0)


def statuses(status: str) -> list[tuple[str, int, int]]:
    st = TxnState("t1", Phase.RUNNING, TxnPlan("t1", (member("d0", "j0"), member("d1", "j1")),
                                               "none", 10.0),
                  bytes_total={("vm1", "d0"): 4096, ("vm1", "d1"): 65536})

    async def first() -> list[tuple[str, int, int]]:
        async for _, disks in progress(cast(Any, {"vm1": Adopted(status)}), st, 0.01):
            return [(d.status, d.done, d.total) for d in disks]
        raise AssertionError("no snapshot")

    return asyncio.run(first())


def test_an_adopted_job_shows_the_totals_of_its_cut() -> None:
    assert statuses("running") == [("running", 0, 4096), ("running", 0, 65536)]
    assert statuses("pending") == [("pending", 4096, 4096), ("pending", 65536, 65536)]
