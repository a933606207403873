"""The agent's loop: journal each event, hand it to the pure participant machine,
carry out the commands it returns (``steps.py``) and feed their outcomes back.

Every public coroutine is one AgentService call and is safe to repeat with the
same transaction id; one lock per transaction orders them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from blocktxn import failpoints
from blocktxn.ids import check_id
from blocktxn.requests import DiskRequest, check_cut

from . import planner, views
from .backend import VmBackend
from .checksums import Checksums
from .config import AgentConfig
from .errors import ConflictError, UnknownError
from .freeze import FreezeControl
from .journal import Journal
from .metrics import AgentMetrics
from .participant import ParticipantMachine, TxnState
from .participant_messages import (
    Aborted,
    AbortRequested,
    ArmAutoThaw,
    Command,
    CommitRequested,
    Committed,
    CutPlanned,
    CutRequested,
    DeadlinePassed,
    DeclineVote,
    Event,
    FinalizeJobs,
    Freezing,
    Phase,
    PrepareRequested,
    Publish,
    Recovered,
    Rollback,
    StageCut,
    StartCut,
    StateError,
    Thawed,
    ThawGuests,
    ThawRequested,
    VotedNo,
)
from .qemu import QemuVm
from .removals import Removals
from .repository import Repository
from .steps import Steps
from .vm_events import VmEvents

log = logging.getLogger(__name__)
T = TypeVar("T")


def make_backends(config: AgentConfig) -> dict[str, VmBackend]:
    """One backend per configured VM (libvirt-python is imported only if a libvirt
    domain is configured: a bare-QEMU host does not need it)."""
    out: dict[str, VmBackend] = {}
    for vm in config.vms:
        if vm.libvirt_domain is not None:
            from .libvirt import LibvirtVm

            out[vm.name] = LibvirtVm(vm.name, config.libvirt_uri, vm.libvirt_domain,
                                     config.qmp_timeout, config.repo)
        else:
            out[vm.name] = QemuVm(vm.name, vm.qmp, vm.ga, config.qmp_timeout, vm.watch)
    return out


class AgentRunner:
    """One host's participant: all its VMs, transactions, journal and repository."""

    def __init__(self, config: AgentConfig, metrics: AgentMetrics | None = None) -> None:
        self.config = config
        restore = list(config.restore_dirs) or [config.repo / "restores"]
        self.repo = Repository(config.repo, restore)
        self.journal = Journal(self.repo.root / "journal.jsonl")
        self.machine = ParticipantMachine()
        self.backends = make_backends(config)
        self.vm_events = VmEvents(self)
        for vm in self.backends.values():
            vm.on_lost = self.vm_events.lost
            vm.on_connected = self.vm_events.connected
        self.freeze = FreezeControl(self.backends, self._deadline_passed)
        self.steps = Steps(self.backends, self.repo, self.freeze)
        self._locks: dict[str, asyncio.Lock] = {}
        self.plan_lock = asyncio.Lock()
        self._barriers: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self.removals = Removals(self.repo, self.machine.busy_disks, self.spawn)
        self.checksums = Checksums(self.repo, self.spawn)

        self.started = False
        self.metrics = metrics or AgentMetrics()
        #: vm -> its disks at the last inventory (a VM not connected then keeps what it had)
        self.disks_seen: Mapping[str, tuple[str, ...]] = {}
        self.metrics.watch(self.repo, lambda: {n: b.connected for n, b in self.backends.items()},
                           lambda: self.disks_seen)

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Replay the journal, connect to every VM, re-drive open transactions."""
        self.journal.replay(self.machine)
        for vm in self.backends.values():
            vm.start()
        await asyncio.gather(
            *(vm.wait_connected(self.config.connect_wait) for vm in self.backends.values()))
        self.started = True
        for txn_id in self.machine.open_txns():
            async with self.lock(txn_id):
                await self.apply(txn_id, Recovered())
                await self.vm_events.check_members_alive(txn_id)
        for vm in self.backends.values():
            if vm.connected:
                self.spawn(self.vm_events.sweep(vm))
        self.checksums.soon()  # images committed before a crash may still lack theirs

    async def stop(self) -> None:
        await self.freeze.stop()
        for task in self._background:
            task.cancel()
        for vm in self.backends.values():
            await vm.stop()
        self.journal.close()
        self.repo.close()

    def lock(self, txn_id: str) -> asyncio.Lock:
        return self._locks.setdefault(txn_id, asyncio.Lock())

    async def _to_the_end(self, work: Coroutine[Any, Any, T]) -> T:
        """Run *work* to its end even if the caller is cancelled (an RPC past its
        deadline): a cut or decision abandoned half-way would leave a guest quiesced
        or a transaction stuck. The outcome then waits for the caller's retry."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # no "never retrieved"
        return await asyncio.shield(task)

    # ------------------------------------------------------ event/command loop
    def _record(self, txn_id: str, event: Event) -> list[Command]:
        if event.journaled:
            self.journal.append(txn_id, event)
        old = self.machine.phase(txn_id)
        commands = self.machine.handle(txn_id, event)
        self.machine.validate_state()
        self.metrics.observe(event, old, self.machine.txns.get(txn_id), self.machine.txns)
        if isinstance(event, (Committed, Aborted)):
            self._forget()
        if isinstance(event, Committed):
            self.checksums.soon()
        return commands

    def _forget(self) -> None:
        """Keep memory and journal bounded: old finished transactions and idle locks go."""
        self.journal.compact(self.machine)
        if len(self._locks) > len(self.machine.txns) + 64:
            self._locks = {t: lock for t, lock in self._locks.items()
                           if t in self.machine.txns or lock.locked()}

    async def apply(self, txn_id: str, event: Event) -> None:
        await self._run(self._record(txn_id, event))

    async def _run(self, commands: Sequence[Command]) -> None:
        for cmd in commands:
            if isinstance(cmd, FinalizeJobs):  # runs without the lock: an Abort may come
                self._barriers[cmd.txn_id] = self.spawn(self._barrier(cmd))
                continue
            result = await self._execute(cmd)
            if result is not None:
                await self.apply(cmd.txn_id, result)

    async def _barrier(self, cmd: FinalizeJobs) -> None:
        """prepare_to_complete, outside the transaction's lock (copying may take long,
        and an Abort must be able to cancel the jobs meanwhile); then record the vote."""
        try:
            cut_at = self.machine.txns[cmd.txn_id].cut_at
            try:
                vote = await self.steps.barrier(cmd, cut_at)
            except Exception as err:  # a bug: never leave the vote hanging
                log.exception("txn %s: barrier failed", cmd.txn_id)
                vote = VotedNo(f"barrier failed: {err!r}")
            async with self.lock(cmd.txn_id):
                await self.apply(cmd.txn_id, vote)
        finally:
            self._barriers.pop(cmd.txn_id, None)

    async def _execute(self, cmd: Command) -> Event | None:
        if isinstance(cmd, StageCut):
            return await self.steps.stage(cmd.plan)
        if isinstance(cmd, StartCut):
            if cmd.plan.quiesce != "none":  # journaled before the first freeze (no fsync)
                self._record(cmd.txn_id, Freezing())
            return await self.steps.cut(cmd.plan)
        if isinstance(cmd, ArmAutoThaw):
            self.freeze.arm(cmd.txn_id, cmd.deadline)
            return None
        if isinstance(cmd, ThawGuests):
            self.freeze.disarm(cmd.txn_id)
            failed = await self.freeze.thaw(cmd.txn_id, cmd.vms, cmd.quiesce, cmd.after_restart)
            return Thawed(cmd.on_own or bool(failed), time.time(), "; ".join(failed))
        if isinstance(cmd, DeclineVote):
            return VotedNo(cmd.reason)
        if isinstance(cmd, Publish):
            return await self.steps.publish(cmd.txn_id, cmd.members, cmd.images)
        if isinstance(cmd, Rollback):
            await self._stop_barrier(cmd.txn_id)
            event = await self.steps.rollback(cmd)
            self.spawn(self._sweep_after(cmd.txn_id, {m.vm for m in cmd.members}))
            return event
        raise AssertionError(f"unknown command {cmd!r}")

    async def _stop_barrier(self, txn_id: str) -> None:
        """An Abort while the barrier still runs: stop the barrier first, so that it and
        the rollback never work on the same job at once (QEMU then shows one state)."""
        task = self._barriers.get(txn_id)
        if task is None or task.done() or task is asyncio.current_task():
            return
        task.cancel()
        await asyncio.wait({task}, timeout=60)

    async def _sweep_after(self, txn_id: str, vms: set[str]) -> None:
        """Once a rollback is recorded, remove whatever of ours it could not."""
        async with self.lock(txn_id):
            pass
        for name in sorted(vms):
            vm = self.backends.get(name)
            if vm is not None and vm.connected:
                await self.vm_events.sweep(vm)

    async def _deadline_passed(self, txn_id: str) -> None:
        """The freeze deadline of *txn_id* passed before the coordinator's thaw."""
        st = self.machine.txns.get(txn_id)
        if st is None or st.plan is None:
            return
        await self.freeze.thaw(txn_id, st.plan.vms, st.plan.quiesce)  # before any lock
        async with self.lock(txn_id):
            await self.apply(txn_id, DeadlinePassed())

    # ------------------------------------------------------------------ calls
    async def inventory(self) -> list[views.VmView]:
        taken = await views.inventory(self.backends, self.machine, self.repo,
                                      self.freeze.frozen_by())
        seen = {vm: d for vm, d in self.disks_seen.items() if vm in self.backends}
        seen.update((v.name, tuple(d.name for d in v.disks)) for v in taken if v.connected)
        self.disks_seen = seen  # replaced whole: the metrics thread reads it
        return taken

    async def cut(self, txn_id: str, disks: Sequence[DiskRequest], quiesce: str = "none",
                  freeze_timeout: float = 0.0, individual: bool = False,
                  stage_only: bool = False) -> TxnState:
        """Quiesce and start every member's backup job; with *stage_only*, only what
        comes before the freeze (the next Cut of the same members does the rest); see
        the proto.

        Raises:
            InvalidInput, UnknownError, ConflictError (nothing changed), or
            ConflictError after a failed cut that was rolled back.
        """
        check_cut(txn_id, list(disks), quiesce, freeze_timeout)
        for d in disks:
            if d.vm not in self.backends:
                raise UnknownError(f"unknown VM {d.vm!r} on agent {self.config.agent_id}")
        if quiesce == "freeze":
            missing = sorted({d.vm for d in disks if not self.backends[d.vm].can_freeze})
            if missing:
                raise ConflictError(f"quiesce freeze needs a guest agent; none for {missing}")
        return await self._to_the_end(
            self._cut(txn_id, disks, quiesce, freeze_timeout, individual, stage_only))

    async def _cut(self, txn_id: str, disks: Sequence[DiskRequest], quiesce: str,
                   freeze_timeout: float, individual: bool, stage_only: bool) -> TxnState:
        async with self.lock(txn_id):
            known = self.machine.txns.get(txn_id)
            if known is not None:
                if known.plan is None or {m.key for m in known.members} != {
                        (d.vm, d.disk) for d in disks}:
                    raise ConflictError(
                        f"transaction {txn_id} is already {known.phase.value} with other members")
            else:
                await self.removals.before_cut(disks)
                async with self.plan_lock:
                    plan = planner.plan_cut(txn_id, disks, quiesce, freeze_timeout,
                                            await self._facts(disks, quiesce), individual)
                    commands = self._record(txn_id, CutPlanned(plan))
                await self._run(commands)
            if not stage_only:
                await self.apply(txn_id, CutRequested())
            st = self.machine.txns[txn_id]
            if st.phase == Phase.ABORTED:
                raise ConflictError(f"cut of {txn_id} failed and was rolled back: "
                                    f"{st.failure or st.abort_reason}")
            return st

    async def _facts(self, disks: Sequence[DiskRequest], quiesce: str) -> planner.Facts:
        """What the planner needs, read from the VMs, the catalog and the machine."""
        found = {}
        for name in sorted({d.vm for d in disks}):
            vm = self.backends[name]
            if not vm.connected:
                raise ConflictError(f"VM {name} is lost (its QMP socket is not connected)")
            found[name] = await vm.disks()
            problem = await vm.pause_problem() if quiesce == "pause" else ""
            if problem:
                raise ConflictError(f"VM {name} cannot pause: {problem}; "
                                    "use quiesce freeze or none")
        return planner.Facts(
            disks=found, last_image=self.repo.last_image,
            image_exists=lambda rel: self.repo.path(rel).exists(),
            image_rel=self.repo.image_rel, busy=self.machine.busy_disks(),
            frozen={**self.machine.quiesce_holders(), **self.freeze.frozen_by()},
            pruning=dict(self.removals.pruning), chain_length=self.repo.chain_length,
            max_chain=self.config.max_chain, repo_free=self.repo.space()[1])

    async def thaw(self, txn_id: str) -> TxnState:
        """End the freeze of *txn_id*. Raises: InvalidInput, UnknownError."""
        st = self._known(txn_id)
        async with self.lock(txn_id):
            await self.apply(txn_id, ThawRequested(time.time()))
        return st

    async def status(self, txn_id: str, interval: float
                     ) -> AsyncIterator[tuple[TxnState, list[views.DiskStatus]]]:
        """Progress snapshots until no job of *txn_id* runs. Raises: InvalidInput,
        UnknownError."""
        async for snapshot in views.progress(self.backends, self._known(txn_id), interval):
            yield snapshot

    async def prepare(self, txn_id: str, timeout: float | None = None) -> TxnState:
        """Run the prepare_to_complete barrier and vote; see the proto.

        Raises:
            InvalidInput, ConflictError (prepare before thaw).
        """
        check_id(txn_id, "transaction id")
        async with self.lock(txn_id):
            if txn_id not in self.machine.txns:
                self._forget()
                return TxnState(txn_id, Phase.VOTED_NO, failure="transaction unknown on this agent")
            await self._decide(txn_id, PrepareRequested(timeout))
        barrier = self._barriers.get(txn_id)
        if barrier is not None:  # ours, or one a repeated Prepare started earlier
            try:
                await asyncio.shield(barrier)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # our caller gave up
                # an Abort stopped the barrier: the answer is the state it left
        return self.machine.txns[txn_id]

    async def commit(self, txn_id: str) -> TxnState:
        """Apply a durable COMMIT decision.

        Raises:
            InvalidInput, UnknownError, ConflictError (did not vote YES).
        """
        self._known(txn_id)
        failpoints.hit("agent_commit")
        return await self._to_the_end(self._locked_decide(txn_id, CommitRequested()))

    async def abort(self, txn_id: str, reason: str) -> TxnState:
        """Apply an ABORT decision (also for a transaction never seen here).

        Raises:
            InvalidInput, ConflictError (already committed).
        """
        check_id(txn_id, "transaction id")
        return await self._to_the_end(
            self._locked_decide(txn_id, AbortRequested(reason or "aborted")))

    async def abandon(self, txn_id: str, reason: str) -> bool:
        """Roll back *txn_id* on this agent's own account, if it may still be (planned or
        staged, no Cut asked: ParticipantMachine.may_abort_alone, checked under the
        transaction's lock); return whether it was."""
        async def work() -> bool:
            async with self.lock(txn_id):
                if not self.machine.may_abort_alone(txn_id):
                    return False
                await self._decide(txn_id, AbortRequested(reason))
                return True

        check_id(txn_id, "transaction id")
        return await self._to_the_end(work())

    async def _locked_decide(self, txn_id: str, event: Event) -> TxnState:
        async with self.lock(txn_id):
            return await self._decide(txn_id, event)

    async def _decide(self, txn_id: str, event: Event) -> TxnState:
        try:
            await self.apply(txn_id, event)
        except StateError as err:
            raise ConflictError(str(err)) from err
        return self.machine.txns[txn_id]

    def _known(self, txn_id: str) -> TxnState:
        check_id(txn_id, "transaction id")
        st = self.machine.txns.get(txn_id)
        if st is None:
            raise UnknownError(f"transaction {txn_id} is unknown on this agent")
        return st

    async def restore(self, set_id: str, vm: str, disk: str, dest: str, fmt: str) -> Path:
        """See Repository.restore. Raises: InvalidInput, UnknownError, ConflictError."""
        for value, what in ((set_id, "set id"), (vm, "VM name"), (disk, "disk name")):
            check_id(value, what)
        return await self.repo.restore(set_id, vm, disk, dest, fmt or "raw")

    async def verify(self, set_id: str) -> list[tuple[str, bool, str]]:
        """See Repository.verify. Raises: InvalidInput, UnknownError."""
        check_id(set_id, "set id")
        return await self.repo.verify(set_id)

    async def forget(self, set_id: str, check_only: bool = False) -> int:
        """See Removals.forget. Raises: InvalidInput, ConflictError, AgentError."""
        check_id(set_id, "set id")
        return await self.removals.forget(set_id, check_only)

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task
