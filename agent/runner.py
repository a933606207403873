"""The agent's runner: executes the participant machine's commands against QMP,
the guest agents and the repository, and feeds the results back as events.

Every public coroutine is safe to repeat with the same transaction id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from blocktxn.ids import IdentifierError, check_id
from blocktxn.requests import MODES, QUIESCES

from .config import AgentConfig
from .errors import (
    AgentError,
    BadRequestError,
    ConflictError,
    QemuError,
    UnknownError,
    VmLostError,
)
from .guest_agent import GuestAgentClient
from .journal import Journal
from .participant import (
    OPEN_PHASES,
    Aborted,
    AbortRequested,
    ArmAutoThaw,
    Command,
    CommitRequested,
    Committed,
    CutDone,
    CutFailed,
    CutPlanned,
    DeadlinePassed,
    DeclineVote,
    Event,
    FinalizeJobs,
    ImageRecord,
    MemberFailed,
    MemberPlan,
    ParticipantMachine,
    Phase,
    Prepared,
    PrepareRequested,
    Publish,
    Recovered,
    Rollback,
    StartCut,
    StateError,
    Thawed,
    ThawGuests,
    ThawRequested,
    TxnPlan,
    TxnState,
    VotedNo,
    event_from_record,
    event_to_record,
)
from .qmp import BITMAP_PREFIX, NODE_PREFIX, DiskNode, VmConnection
from .repository import Repository

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_FREEZE_TIMEOUT = 10.0
KEEP_FINISHED = 200  # finished transactions remembered across journal compaction


@dataclass(frozen=True)
class MemberRequest:
    vm: str
    disk: str
    mode: str = "auto"
    speed: int = 0


@dataclass(frozen=True)
class DiskView:
    name: str
    size: int
    format: str
    checkpoint: str
    usable: bool
    problem: str
    busy_txn: str


@dataclass(frozen=True)
class VmView:
    name: str
    connected: bool
    disks: tuple[DiskView, ...]
    jobs: tuple[str, ...]
    frozen: bool
    has_guest_agent: bool


@dataclass(frozen=True)
class DiskStatus:
    vm: str
    disk: str
    status: str
    done: int
    total: int
    error: str


def short_name(*parts: str) -> str:
    """A QMP node/job name (< 32 chars) unique to *parts*."""
    return NODE_PREFIX + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


async def gather_all(*aws: Awaitable[T]) -> list[T]:
    """Like asyncio.gather, but when one fails, wait for the others to finish before
    raising the first error: a rollback must not race a step still in flight."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


def _safe(value: str, what: str) -> str:
    try:
        return check_id(value, what)
    except IdentifierError as err:
        raise BadRequestError(str(err)) from err


class AgentRunner:
    """One host's participant: all its VMs, transactions, journal and repository."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        restore = list(config.restore_dirs) or [config.repo / "restores"]
        self.repo = Repository(config.repo, restore)
        self.journal = Journal(self.repo.root / "journal.jsonl")
        self.machine = ParticipantMachine()
        self.vms: dict[str, VmConnection] = {}
        self.guest_agents: dict[str, GuestAgentClient] = {}
        for vm in config.vms:
            conn = VmConnection(vm.name, vm.qmp, timeout=config.qmp_timeout)
            conn.on_lost = self._vm_lost
            conn.on_connected = self._vm_connected
            self.vms[vm.name] = conn
            if vm.ga:
                self.guest_agents[vm.name] = GuestAgentClient(vm.ga)
        self.frozen: dict[str, str] = {}  # vm -> txn id that froze it
        self.watchdogs: dict[str, asyncio.subprocess.Process] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._plan_lock = asyncio.Lock()
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._started = False

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Replay the journal, connect to every VM, re-drive open transactions."""
        self._replay()
        for conn in self.vms.values():
            conn.start()
        await asyncio.gather(
            *(c.wait_connected(self.config.connect_wait) for c in self.vms.values())
        )
        self._started = True
        for txn_id in self.machine.open_txns():
            async with self._lock(txn_id):
                await self._apply(txn_id, Recovered())
                await self._check_members_alive(txn_id)

    async def stop(self) -> None:
        for task in [*self._timers.values(), *self._background]:
            task.cancel()
        for conn in self.vms.values():
            await conn.stop()
        self.journal.close()

    def _replay(self) -> None:
        records = self.journal.replay()
        for record in records:
            try:
                txn_id, event = event_from_record(record)
                self.machine.handle(txn_id, event)
            except (StateError, ValueError, KeyError, TypeError) as err:
                log.error("journal record skipped (%s): %s", err, record)
        finished = [t for t, st in self.machine.txns.items() if st.phase not in OPEN_PHASES]
        drop = set(finished[:-KEEP_FINISHED]) if len(finished) > KEEP_FINISHED else set()
        if drop:
            self.journal.rewrite([r for r in records if r.get("txn") not in drop])
            for t in drop:
                del self.machine.txns[t]
        log.info("journal replayed: %d records, open: %s", len(records), self.machine.open_txns())

    def _lock(self, txn_id: str) -> asyncio.Lock:
        return self._locks.setdefault(txn_id, asyncio.Lock())

    # ------------------------------------------------------ event/command loop
    def _record(self, txn_id: str, event: Event) -> list[Command]:
        if event.journaled:
            self.journal.append(event_to_record(txn_id, event))
        commands = self.machine.handle(txn_id, event)
        self.machine.validate_state()
        return commands

    async def _apply(self, txn_id: str, event: Event) -> None:
        await self._run(self._record(txn_id, event))

    async def _run(self, commands: Sequence[Command]) -> None:
        for cmd in commands:
            result = await self._execute(cmd)
            if result is not None:
                await self._apply(cmd.txn_id, result)

    async def _execute(self, cmd: Command) -> Event | None:
        if isinstance(cmd, StartCut):
            return await self._do_cut(cmd.plan)
        if isinstance(cmd, ArmAutoThaw):
            self._arm_auto_thaw(cmd.txn_id, cmd.deadline)
            return None
        if isinstance(cmd, ThawGuests):
            self._disarm(cmd.txn_id)
            await self._thaw(cmd.txn_id, cmd.vms, cmd.quiesce)
            return Thawed(cmd.on_own, time.time())
        if isinstance(cmd, FinalizeJobs):
            return await self._finalize(cmd.txn_id, cmd.members, cmd.timeout)
        if isinstance(cmd, DeclineVote):
            return VotedNo(cmd.reason)
        if isinstance(cmd, Publish):
            return await self._publish(cmd.members, cmd.images)
        if isinstance(cmd, Rollback):
            await self._rollback(cmd)
            return Aborted(cmd.reason)
        raise AssertionError(f"unknown command {cmd!r}")

    # -------------------------------------------------------------- inventory
    def _checkpoint_state(self, vm: str, node: DiskNode) -> tuple[str, bool, str]:
        last = self.repo.last_image(vm, node.name)
        if last is None:
            return "", False, "no committed backup yet"
        bitmap = node.bitmap(last.checkpoint)
        if bitmap is None:
            return last.checkpoint, False, "checkpoint bitmap missing (QEMU restarted uncleanly?)"
        if bitmap.inconsistent:
            return last.checkpoint, False, "checkpoint bitmap inconsistent (unclean shutdown)"
        if not bitmap.recording:
            return last.checkpoint, False, "checkpoint bitmap not recording"
        if not self.repo.path(last.image).exists():
            return last.checkpoint, False, "previous image missing from the repository"
        return last.checkpoint, True, ""

    async def inventory(self) -> list[VmView]:
        busy = self.machine.busy_disks()
        out = []
        for name, conn in self.vms.items():
            disks: list[DiskView] = []
            if conn.connected:
                with contextlib.suppress(AgentError):
                    for node in (await conn.disks()).values():
                        ckpt, usable, problem = self._checkpoint_state(name, node)
                        disks.append(DiskView(node.name, node.size, node.format, ckpt, usable,
                                              problem, busy.get((name, node.name), "")))
            out.append(VmView(name, conn.connected, tuple(disks), tuple(sorted(conn.jobs)),
                              name in self.frozen, name in self.guest_agents))
        return out

    # -------------------------------------------------------------------- cut
    def _validate_cut(
        self, txn_id: str, members: Sequence[MemberRequest], quiesce: str, freeze_timeout: float
    ) -> None:
        _safe(txn_id, "transaction id")
        if not members:
            raise BadRequestError("no members: a cut needs at least one VM/disk")
        if quiesce not in QUIESCES:
            raise BadRequestError(f"quiesce {quiesce!r} is not one of {', '.join(QUIESCES)}")
        if not 0 <= freeze_timeout <= 3600:
            raise BadRequestError(f"freeze timeout {freeze_timeout} is not within 0..3600 s")
        seen: set[tuple[str, str]] = set()
        for m in members:
            _safe(m.vm, "VM name")
            _safe(m.disk, "disk name")
            if m.mode not in MODES:
                raise BadRequestError(f"mode {m.mode!r} is not one of {', '.join(MODES)}")
            if m.speed < 0:
                raise BadRequestError(f"speed {m.speed} is negative")
            if (m.vm, m.disk) in seen:
                raise BadRequestError(f"disk {m.vm}/{m.disk} is named twice")
            seen.add((m.vm, m.disk))
            if m.vm not in self.vms:
                raise UnknownError(f"unknown VM {m.vm!r} on agent {self.config.agent_id}")
        if quiesce == "freeze":
            missing = sorted({m.vm for m in members} - set(self.guest_agents))
            if missing:
                raise ConflictError(f"quiesce freeze needs a guest agent; none for {missing}")

    async def _plan(
        self, txn_id: str, members: Sequence[MemberRequest], quiesce: str, freeze_timeout: float
    ) -> TxnPlan:
        busy = self.machine.busy_disks()
        nodes: dict[str, dict[str, DiskNode]] = {}
        for vm in sorted({m.vm for m in members}):
            conn = self.vms[vm]
            if not conn.connected:
                raise ConflictError(f"VM {vm} is lost (its QMP socket is not connected)")
            nodes[vm] = await conn.disks()
            if quiesce == "pause" and "stop" not in await conn.commands():
                raise ConflictError(f"VM {vm} cannot pause: QEMU has no QMP stop "
                                    "(qemu-storage-daemon?); use quiesce freeze or none")
        plans = []
        for m in members:
            node = nodes[m.vm].get(m.disk)
            if node is None:
                raise UnknownError(f"unknown disk {m.disk!r} on VM {m.vm}")
            if (m.vm, m.disk) in busy:
                raise ConflictError(
                    f"disk {m.vm}/{m.disk} is in open transaction {busy[(m.vm, m.disk)]}"
                )
            ckpt, usable, problem = self._checkpoint_state(m.vm, node)
            if m.mode == "full":
                mode, reason = "full", "full requested"
            elif usable:
                mode, reason = "incremental", f"checkpoint {ckpt} is usable"
            elif m.mode == "incremental":
                raise ConflictError(f"incremental backup of {m.vm}/{m.disk} impossible: {problem}")
            else:
                mode, reason = "full", problem
            last = self.repo.last_image(m.vm, m.disk)
            new_bitmap = BITMAP_PREFIX + txn_id
            if node.bitmap(new_bitmap) is not None:
                raise ConflictError(f"{m.vm}/{m.disk} already has a bitmap {new_bitmap}")
            plans.append(MemberPlan(
                vm=m.vm, disk=m.disk, mode=mode, mode_reason=reason,
                new_bitmap=new_bitmap,
                sync_bitmap=ckpt if mode == "incremental" else None,
                stale_bitmaps=tuple(
                    b.name for b in node.bitmaps if b.name.startswith(BITMAP_PREFIX)
                ),
                job_id=short_name(txn_id, m.vm, m.disk, "job"),
                target_node=short_name(txn_id, m.vm, m.disk, "target"),
                image=self.repo.image_rel(m.vm, m.disk, txn_id),
                backing=last.image if mode == "incremental" and last else "",
                size=node.size, speed=m.speed,
            ))
        for vm in nodes:  # a freeze is VM-wide: one transaction at a time
            if quiesce != "none" and vm in self.frozen:
                raise ConflictError(f"VM {vm} is frozen by transaction {self.frozen[vm]}")
        timeout = freeze_timeout or DEFAULT_FREEZE_TIMEOUT
        return TxnPlan(txn_id, tuple(plans), quiesce, timeout)

    async def cut(
        self, txn_id: str, members: Sequence[MemberRequest], quiesce: str = "none",
        freeze_timeout: float = 0.0,
    ) -> TxnState:
        """Quiesce and start every member's backup job; see the proto.

        Raises:
            BadRequestError, UnknownError, ConflictError (nothing changed), or
            ConflictError after a failed cut that was rolled back.
        """
        self._validate_cut(txn_id, members, quiesce, freeze_timeout)
        async with self._lock(txn_id):
            known = self.machine.txns.get(txn_id)
            if known is not None:
                requested = {(m.vm, m.disk) for m in members}
                if known.plan is None or {mp.key for mp in known.members} != requested:
                    raise ConflictError(
                        f"transaction {txn_id} is already {known.phase.value} with other members"
                    )
            else:
                async with self._plan_lock:
                    plan = await self._plan(txn_id, members, quiesce, freeze_timeout)
                    commands = self._record(txn_id, CutPlanned(plan))
                await self._run(commands)
            st = self.machine.txns[txn_id]
            if st.phase == Phase.ABORTED:
                raise ConflictError(f"cut of {txn_id} failed and was rolled back: "
                                    f"{st.failure or st.abort_reason}")
            return st

    async def _do_cut(self, plan: TxnPlan) -> Event:
        by_vm: dict[str, list[MemberPlan]] = {}
        for m in plan.members:
            by_vm.setdefault(m.vm, []).append(m)
        try:
            if plan.quiesce == "freeze":  # started now, armed just before each freeze
                await gather_all(*(self._start_watchdog(vm) for vm in by_vm))
            await gather_all(
                *(self.repo.create_image(m.image, m.size, m.backing) for m in plan.members)
            )
            await gather_all(*(
                self.vms[m.vm].execute("blockdev-add", {
                    "driver": "qcow2", "node-name": m.target_node, "backing": None,
                    "file": {"driver": "file", "filename": str(self.repo.path(m.image))},
                }) for m in plan.members))
            frozen_at = time.time()
            deadline = frozen_at + plan.freeze_timeout
            await asyncio.wait_for(
                gather_all(*(self._cut_vm(plan, vm, ms, deadline) for vm, ms in by_vm.items())),
                plan.freeze_timeout,
            )
            cut_at = time.time()
            totals = []
            for vm, ms in by_vm.items():
                jobs = await self.vms[vm].refresh_jobs()
                totals += [(vm, m.disk, jobs[m.job_id].total if m.job_id in jobs else 0)
                           for m in ms]
            if plan.quiesce == "none":
                frozen_at = 0.0
            return CutDone(frozen_at, cut_at, deadline, tuple(totals))
        except TimeoutError:
            return CutFailed(f"cut did not finish within the freeze timeout "
                             f"({plan.freeze_timeout:g}s)")
        except AgentError as err:
            return CutFailed(str(err))

    async def _cut_vm(self, plan: TxnPlan, vm: str, members: list[MemberPlan],
                      deadline: float) -> None:
        conn = self.vms[vm]
        if plan.quiesce == "freeze":
            self.frozen[vm] = plan.txn_id
            await self._arm_watchdog(vm, deadline)
            await self.guest_agents[vm].freeze()
        elif plan.quiesce == "pause":
            self.frozen[vm] = plan.txn_id
            await conn.execute("stop")
        actions: list[dict[str, Any]] = []
        for m in members:
            actions.append({"type": "block-dirty-bitmap-add", "data": {
                "node": m.disk, "name": m.new_bitmap, "persistent": True}})
        for m in members:
            backup: dict[str, Any] = {
                "job-id": m.job_id, "device": m.disk, "target": m.target_node,
                "auto-finalize": False, "auto-dismiss": False,
            }
            if m.mode == "incremental":
                backup.update(sync="bitmap", bitmap=m.sync_bitmap, **{"bitmap-mode": "never"})
            else:
                backup["sync"] = "full"
            if m.speed:
                backup["speed"] = m.speed
            actions.append({"type": "blockdev-backup", "data": backup})
        await conn.execute("transaction", {
            "actions": actions, "properties": {"completion-mode": "individual"}})

    # ------------------------------------------------------------ freeze/thaw
    async def _thaw(self, txn_id: str, vms: Sequence[str], quiesce: str) -> None:
        async def one(vm: str) -> None:
            if self.frozen.get(vm) != txn_id:
                if vm not in self.frozen:
                    self._stop_watchdog(vm)  # started for a freeze that never came
                return
            try:
                if quiesce == "freeze":
                    await self.guest_agents[vm].thaw()
                elif quiesce == "pause":
                    await self.vms[vm].execute("cont")
            except AgentError as err:
                log.error("vm %s: thaw failed: %s", vm, err)
            finally:
                self.frozen.pop(vm, None)
                self._stop_watchdog(vm)

        await asyncio.gather(*(one(vm) for vm in vms))

    async def _start_watchdog(self, vm: str) -> None:
        """A separate process that will thaw the guest at the deadline even if this
        agent is stopped or dead (see agent/watchdog.py)."""
        self._stop_watchdog(vm)
        ga = next(v.ga for v in self.config.vms if v.name == vm)
        assert ga is not None
        self.watchdogs[vm] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "blocktxn.agent.watchdog", "--ga", ga,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            start_new_session=True)

    async def _arm_watchdog(self, vm: str, deadline: float) -> None:
        """Give the watchdog its deadline: from now on it will thaw by itself.

        Raises:
            QemuError: no watchdog is running, so the guest must not be frozen.
        """
        proc = self.watchdogs.get(vm)
        if proc is None or proc.stdin is None or proc.returncode is not None:
            raise QemuError(f"VM {vm}: freeze watchdog is not running; not freezing")
        try:
            proc.stdin.write(f"{deadline!r}\n".encode())
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as err:
            raise QemuError(f"VM {vm}: freeze watchdog is gone; not freezing") from err

    def _stop_watchdog(self, vm: str) -> None:
        proc = self.watchdogs.pop(vm, None)
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            self._spawn(proc.wait())

    def _arm_auto_thaw(self, txn_id: str, deadline: float) -> None:
        async def fire() -> None:
            await asyncio.sleep(max(0.0, deadline - time.time()))
            st = self.machine.txns.get(txn_id)
            if st is None or st.plan is None:
                return
            log.warning("txn %s: freeze deadline passed, thawing on our own", txn_id)
            await self._thaw(txn_id, st.plan.vms, st.plan.quiesce)  # before any lock
            async with self._lock(txn_id):
                self._timers.pop(txn_id, None)
                await self._apply(txn_id, DeadlinePassed())

        self._disarm(txn_id)
        self._timers[txn_id] = asyncio.create_task(fire(), name=f"auto-thaw-{txn_id}")

    def _disarm(self, txn_id: str) -> None:
        task = self._timers.pop(txn_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def thaw(self, txn_id: str) -> TxnState:
        """End the freeze of *txn_id*.

        Raises:
            BadRequestError, UnknownError.
        """
        st = self._known(txn_id)
        async with self._lock(txn_id):
            await self._apply(txn_id, ThawRequested(time.time()))
        return st

    # ----------------------------------------------------------------- status
    async def status(self, txn_id: str, interval: float) -> AsyncIterator[
            tuple[TxnState, list[DiskStatus]]]:
        """Progress snapshots until no job of *txn_id* is running any more.

        Raises:
            BadRequestError, UnknownError.
        """
        st = self._known(txn_id)
        while True:
            jobs: dict[str, dict[str, Any]] = {}
            for vm in {m.vm for m in st.members}:
                conn = self.vms[vm]
                with contextlib.suppress(AgentError):
                    jobs[vm] = dict(await conn.refresh_jobs()) if conn.connected else {}
            disks = []
            for m in st.members:
                job = jobs.get(m.vm, {}).get(m.job_id)
                if job is not None:
                    disks.append(DiskStatus(m.vm, m.disk, job.status, job.done, job.total,
                                            job.error))
                else:
                    image = next((i for i in st.images if (i.vm, i.disk) == m.key), None)
                    total = st.bytes_total.get(m.key, 0)
                    if image is not None:
                        disks.append(DiskStatus(m.vm, m.disk, "done", image.bytes, image.bytes, ""))
                    else:
                        disks.append(DiskStatus(m.vm, m.disk, "gone", 0, total, ""))
            yield st, disks
            running = st.phase in (Phase.CUTTING, Phase.FROZEN, Phase.RUNNING) and any(
                d.status not in ("pending", "concluded", "done", "gone") for d in disks
            )
            if not running:
                return
            await asyncio.sleep(interval)

    # ---------------------------------------------------------------- prepare
    async def prepare(self, txn_id: str, timeout: float | None = None) -> TxnState:
        """Run the prepare_to_complete barrier and vote; see the proto.

        Raises:
            BadRequestError, ConflictError (prepare before thaw).
        """
        _safe(txn_id, "transaction id")
        async with self._lock(txn_id):
            if txn_id not in self.machine.txns:
                return TxnState(txn_id, Phase.VOTED_NO, failure="transaction unknown on this agent")
            try:
                await self._apply(txn_id, PrepareRequested(timeout))
            except StateError as err:
                raise ConflictError(str(err)) from err
            return self.machine.txns[txn_id]

    async def _finalize(
        self, txn_id: str, members: tuple[MemberPlan, ...], timeout: float | None
    ) -> Event:
        st = self.machine.txns[txn_id]
        try:
            async def to_pending(m: MemberPlan) -> None:
                job = await self.vms[m.vm].wait_job(m.job_id, {"pending"}, timeout)
                if job.status != "pending":
                    raise QemuError(f"{m.vm}/{m.disk}: backup job {job.status}"
                                    f"{': ' + job.error if job.error else ''}")

            await gather_all(*(to_pending(m) for m in members))

            async def finish(m: MemberPlan) -> ImageRecord:
                conn = self.vms[m.vm]
                await conn.execute("job-finalize", {"id": m.job_id})
                job = await conn.wait_job(m.job_id, {"concluded"}, 60)
                if job.error:
                    raise QemuError(f"{m.vm}/{m.disk}: finalize failed: {job.error}")
                copied = job.done
                await conn.execute("job-dismiss", {"id": m.job_id})
                await conn.execute("blockdev-del", {"node-name": m.target_node})
                return ImageRecord(
                    vm=m.vm, disk=m.disk, set_id=txn_id, image=m.image, backing=m.backing,
                    mode=m.mode, bytes=copied, size=m.size, cut_at=st.cut_at,
                    checkpoint=m.new_bitmap,
                )

            images = await gather_all(*(finish(m) for m in members))
            await self.repo.make_durable([m.image for m in members])
            return Prepared(tuple(images))
        except AgentError as err:
            return VotedNo(str(err))

    # --------------------------------------------------------- commit / abort
    async def commit(self, txn_id: str) -> TxnState:
        """Apply a durable COMMIT decision.

        Raises:
            BadRequestError, UnknownError, ConflictError (did not vote YES).
        """
        self._known(txn_id)
        async with self._lock(txn_id):
            try:
                await self._apply(txn_id, CommitRequested())
            except StateError as err:
                raise ConflictError(str(err)) from err
            return self.machine.txns[txn_id]

    async def abort(self, txn_id: str, reason: str) -> TxnState:
        """Apply an ABORT decision (also for a transaction never seen here).

        Raises:
            BadRequestError, ConflictError (already committed).
        """
        _safe(txn_id, "transaction id")
        async with self._lock(txn_id):
            try:
                await self._apply(txn_id, AbortRequested(reason or "aborted"))
            except StateError as err:
                raise ConflictError(str(err)) from err
            return self.machine.txns[txn_id]

    async def _publish(
        self, members: tuple[MemberPlan, ...], images: tuple[ImageRecord, ...]
    ) -> Event:
        drop = [(m.vm, m.disk, name) for m in members for name in m.stale_bitmaps]
        removing = self._remove_bitmaps(drop)
        checksums = asyncio.ensure_future(gather_all(*(self.repo.sha256(i.image)
                                                      for i in images)))
        await gather_all(checksums, removing)
        sums = checksums.result()
        done = tuple(replace(i, sha256=s) for i, s in zip(images, sums, strict=True))
        self.repo.record(list(done))
        return Committed(done)

    async def _remove_bitmaps(self, bitmaps: Sequence[tuple[str, str, str]]) -> None:
        """Drop our (vm, disk, bitmap)s; a lost VM or an absent bitmap is not an error."""
        for vm in sorted({b[0] for b in bitmaps}):
            conn = self.vms[vm]
            mine = [(disk, name) for v, disk, name in bitmaps if v == vm]
            if not conn.connected:
                log.warning("vm %s lost: bitmaps %s left for later cleanup", vm, mine)
                continue
            try:
                nodes = await conn.disks()
                await asyncio.gather(*(
                    conn.execute("block-dirty-bitmap-remove", {"node": disk, "name": name})
                    for disk, name in mine
                    if disk in nodes and nodes[disk].bitmap(name) is not None))
            except VmLostError:
                log.warning("vm %s lost while dropping bitmaps %s", vm, mine)

    async def _rollback(self, cmd: Rollback) -> None:
        self._disarm(cmd.txn_id)
        if cmd.thaw_vms:
            await self._thaw(cmd.txn_id, cmd.thaw_vms, cmd.quiesce)
        by_vm: dict[str, list[MemberPlan]] = {}
        for m in cmd.members:
            by_vm.setdefault(m.vm, []).append(m)
        await asyncio.gather(*(self._rollback_vm(cmd.txn_id, vm, ms)
                               for vm, ms in by_vm.items()))
        try:
            await self._remove_bitmaps([(m.vm, m.disk, m.new_bitmap) for m in cmd.members])
        except AgentError as err:
            log.warning("rollback of %s: new checkpoints not all dropped: %s", cmd.txn_id, err)
        for m in cmd.members:
            self.repo.delete_image(m.image)

    async def _rollback_vm(self, txn_id: str, vm: str, members: list[MemberPlan]) -> None:
        """Cancel and dismiss this VM's jobs of the transaction, delete their targets
        (one query of jobs and one of nodes for all of them)."""
        conn = self.vms[vm]
        if not conn.connected:
            return
        try:
            jobs = dict(await conn.refresh_jobs())

            async def cancel(job_id: str) -> None:
                if jobs[job_id].status != "concluded":
                    await conn.execute("job-cancel", {"id": job_id})
                    await conn.wait_job(job_id, {"concluded"}, 60)
                await conn.execute("job-dismiss", {"id": job_id})

            await gather_all(*(cancel(m.job_id) for m in members if m.job_id in jobs))
            nodes = await conn.node_names()
            await gather_all(*(conn.execute("blockdev-del", {"node-name": m.target_node})
                               for m in members if m.target_node in nodes))
        except AgentError as err:
            log.warning("rollback of %s on %s incomplete: %s", txn_id, vm, err)

    # ------------------------------------------------------------- VM events
    async def _vm_lost(self, conn: VmConnection) -> None:
        self._spawn(self._fail_members(conn.name, "QEMU connection lost"))

    async def _vm_connected(self, conn: VmConnection) -> None:
        if not self._started:
            return
        for txn_id in self.machine.open_txns():
            self._spawn(self._check_members_alive(txn_id, lock=True))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fail_members(self, vm: str, reason: str) -> None:
        for txn_id in self.machine.open_txns():
            st = self.machine.txns[txn_id]
            if st.phase in (Phase.CUTTING, Phase.FROZEN, Phase.RUNNING) and any(
                m.vm == vm for m in st.members
            ):
                async with self._lock(txn_id):
                    await self._apply(txn_id, MemberFailed(vm, "", reason))

    async def _check_members_alive(self, txn_id: str, lock: bool = False) -> None:
        """A running member whose VM is gone or whose job vanished will vote NO."""
        st = self.machine.txns[txn_id]
        if st.phase not in (Phase.FROZEN, Phase.RUNNING):
            return
        for m in st.members:
            conn = self.vms[m.vm]
            problem = ""
            if not conn.connected:
                problem = "QEMU not reachable"
            elif m.job_id not in conn.jobs:
                problem = "backup job vanished (QEMU restarted?)"
            if problem and not st.failure:
                if lock:
                    async with self._lock(txn_id):
                        await self._apply(txn_id, MemberFailed(m.vm, m.disk, problem))
                else:
                    await self._apply(txn_id, MemberFailed(m.vm, m.disk, problem))

    # ------------------------------------------------------- restore / verify
    def _known(self, txn_id: str) -> TxnState:
        _safe(txn_id, "transaction id")
        st = self.machine.txns.get(txn_id)
        if st is None:
            raise UnknownError(f"transaction {txn_id} is unknown on this agent")
        return st

    async def restore(self, set_id: str, vm: str, disk: str, dest: str, fmt: str) -> Any:
        """See Repository.restore. Raises: BadRequestError, UnknownError, ConflictError."""
        for value, what in ((set_id, "set id"), (vm, "VM name"), (disk, "disk name")):
            _safe(value, what)
        return await self.repo.restore(set_id, vm, disk, dest, fmt or "raw")

    async def verify(self, set_id: str) -> list[tuple[str, bool, str]]:
        """See Repository.verify. Raises: BadRequestError, UnknownError."""
        _safe(set_id, "set id")
        return await self.repo.verify(set_id)
