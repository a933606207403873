"""What happens when a VM goes away or comes back: the members of its open
transactions fail (they will vote NO), and the agent's own leftovers in it (jobs,
target nodes, checkpoints a rollback could not remove) are swept."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .backend import VmBackend
from .errors import AgentError
from .participant_messages import MemberFailed, Phase

if TYPE_CHECKING:
    from .runner import AgentRunner

log = logging.getLogger(__name__)


class VmEvents:
    """The runner's reactions to its VMs' connections."""

    def __init__(self, runner: AgentRunner) -> None:
        self.runner = runner

    async def lost(self, vm: VmBackend) -> None:
        log.warning("vm %s: connection lost; its open transactions will vote NO", vm.name)
        self.runner.spawn(self.fail_members(vm.name, "QEMU connection lost"))

    async def connected(self, vm: VmBackend) -> None:
        if not self.runner.started:
            return
        self.runner.spawn(self.sweep(vm))
        for txn_id in self.runner.machine.open_txns():
            self.runner.spawn(self.check_members_alive(txn_id, lock=True))

    async def sweep(self, vm: VmBackend) -> None:
        """Remove what rollbacks could not (the VM was unreachable then): every job, node
        and checkpoint of ours that no open transaction and no committed backup owns."""
        async with self.runner.plan_lock:  # no cut plans meanwhile; a running one is open
            members = [m for t in self.runner.machine.open_txns()
                       for m in self.runner.machine.txns[t].members if m.vm == vm.name]
            keep: dict[str, set[str]] = {}
            for m in members:
                keep.setdefault(m.disk, set()).update(
                    {m.new_bitmap, *([m.sync_bitmap] if m.sync_bitmap else [])})
            last = {i.disk: i.checkpoint for i in self.runner.repo.images(vm.name)}
            for disk, checkpoint in last.items():  # the catalog is in commit order
                keep.setdefault(disk, set()).add(checkpoint)
            try:
                gone = await vm.sweep({m.job_id for m in members},
                                      {m.target_node for m in members}, keep)
            except AgentError as err:
                log.warning("vm %s: sweeping leftovers failed: %s", vm.name, err)
                return
        if gone:
            log.warning("vm %s: removed leftovers: %s", vm.name, ", ".join(gone))

    async def fail_members(self, vm: str, reason: str) -> None:
        for txn_id in self.runner.machine.open_txns():
            st = self.runner.machine.txns[txn_id]
            if st.phase in (Phase.CUTTING, Phase.FROZEN, Phase.RUNNING) and any(
                m.vm == vm for m in st.members
            ):
                async with self.runner.lock(txn_id):
                    await self.runner.apply(txn_id, MemberFailed(vm, "", reason))

    async def check_members_alive(self, txn_id: str, lock: bool = False) -> None:
        """A running member whose VM is gone or whose job vanished will vote NO."""
        st = self.runner.machine.txns[txn_id]
        if st.phase not in (Phase.FROZEN, Phase.RUNNING):
            return
        for m in st.members:
            vm = self.runner.backends[m.vm]
            problem = ""
            if not vm.connected:
                problem = "QEMU not reachable"
            elif m.job_id not in vm.job_ids():
                problem = "backup job vanished (QEMU restarted?)"
            if problem and not st.failure:
                log.warning("txn %s: %s/%s: %s", txn_id, m.vm, m.disk, problem)
                if lock:
                    async with self.runner.lock(txn_id):
                        await self.runner.apply(txn_id, MemberFailed(m.vm, m.disk, problem))
                else:
                    await self.runner.apply(txn_id, MemberFailed(m.vm, m.disk, problem))

