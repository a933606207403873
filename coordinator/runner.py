"""The coordinator's runner: leader election, and one driver task per open
transaction that executes the pure machine's commands against the agents and
etcd and feeds the results back as events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from blocktxn.ids import IdentifierError, check_id
from blocktxn.requests import COMPLETIONS, MODES, QUIESCES
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.wire import MODE_NAME, MODE_PB, QUIESCE_PB

from . import failpoints
from .agent_client import AgentClient
from .config import CoordinatorConfig
from .errors import (
    AgentCallError,
    CoordinatorError,
    NotFoundError,
    NotLeaderError,
    PreconditionError,
    RequestError,
    StoreUnavailableError,
)
from .store import Store
from .txn_machine import (
    OPEN,
    Acked,
    Begin,
    CancelRequested,
    CutReplied,
    DeadlinePassed,
    Decision,
    DecisionDurable,
    Finish,
    MemberSpec,
    Persisted,
    PersistRunning,
    Resumed,
    SendAbort,
    SendCommit,
    SendCut,
    SendPrepare,
    SendThaw,
    ThawReplied,
    TxnCommand,
    TxnEvent,
    TxnMachine,
    TxnPhase,
    VoteReplied,
    WriteDecision,
)

log = logging.getLogger(__name__)
LEASE_TTL = 5
AGENT_TTL = 10


def _safe(value: str, what: str) -> str:
    try:
        return check_id(value, what)
    except IdentifierError as err:
        raise RequestError(str(err)) from err


@dataclass
class TxnRequest:
    request_id: str
    targets: list[tuple[str, str]]  # (target, mode or "")
    mode: str = "auto"
    completion: str = "grouped"
    quiesce: str = "none"
    freeze_timeout: float = 0.0
    deadline: float = 0.0
    speed: int = 0


@dataclass
class LiveTxn:
    """A transaction this leader is driving: its record and its machine."""

    record: dict[str, Any]
    machine: TxnMachine
    events: asyncio.Queue[TxnEvent] = field(default_factory=asyncio.Queue)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def txn_id(self) -> str:
        return str(self.record["txn_id"])

    def members_of(self, agent_id: str) -> list[dict[str, Any]]:
        return [m for m in self.record["members"] if m["agent_id"] == agent_id]

    def member(self, agent_id: str, vm: str, disk: str) -> dict[str, Any] | None:
        return next((m for m in self.record["members"]
                     if (m["agent_id"], m["vm"], m["disk"]) == (agent_id, vm, disk)), None)

    def sync(self) -> None:
        """Copy the machine's view into the record, and wake the watchers."""
        m = self.machine
        r = self.record
        r["phase"] = m.phase.value
        r["decision"] = m.decision.value if m.decision else ""
        r["reason"] = m.reason
        r["committed"] = list(m.committed)
        r["votes"] = [{"agent_id": p.agent_id, "yes": p.vote, "reason": p.reason}
                      for p in m.parts.values() if p.vote is not None]
        self.notify()

    def notify(self) -> None:
        """Wake every watcher; later watchers wait on a fresh event."""
        self.changed.set()
        self.changed = asyncio.Event()


class Coordinator:
    """One replica. Leads when it holds the etcd leader key."""

    def __init__(self, config: CoordinatorConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.epoch: int | None = None
        self.live: dict[str, LiveTxn] = {}
        self.clients: dict[tuple[str, str], AgentClient] = {}
        self._agent_leases: dict[str, Any] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._election: asyncio.Task[None] | None = None

    @property
    def identity(self) -> str:
        return f"{self.config.name}@{self.config.advertise}"

    # -------------------------------------------------------------- election
    def start(self) -> None:
        self._election = asyncio.create_task(self._campaign(), name="election")

    async def stop(self) -> None:
        if self._election:
            self._election.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._election
        self._deposed()
        for client in self.clients.values():
            await client.close()

    async def _campaign(self) -> None:
        while True:
            try:
                lease = await self.store.lease(LEASE_TTL)
                epoch = await self.store.try_lead(self.identity, lease)
                if epoch is None:
                    await asyncio.sleep(0.5)
                    continue
                log.info("%s leads with epoch %d", self.config.name, epoch)
                self.epoch = epoch
                await self._resume_all()
                await self._keep_leading(lease)
                log.warning("%s: leader lease lost", self.config.name)
            except CoordinatorError as err:
                log.warning("%s: election: %s", self.config.name, err)
            except asyncio.CancelledError:
                self._deposed()
                raise
            self._deposed()
            await asyncio.sleep(0.5)

    async def _keep_leading(self, lease: Any) -> None:
        """Refresh the lease; ride out etcd hiccups shorter than the lease's TTL."""
        last_ok = time.monotonic()
        while time.monotonic() - last_ok < LEASE_TTL - 1:
            try:
                if not await self.store.refresh(lease):
                    return
                last_ok = time.monotonic()
            except StoreUnavailableError as err:
                log.warning("%s: lease keepalive failed: %s", self.config.name, err)
            await asyncio.sleep(LEASE_TTL / 5)

    def _deposed(self) -> None:
        if self.epoch is not None:
            log.warning("%s no longer leads", self.config.name)
        self.epoch = None
        for lt in self.live.values():
            if lt.task:
                lt.task.cancel()
        self.live.clear()

    def _require_leader(self) -> int:
        if self.epoch is None:
            raise NotLeaderError("this replica is not the leader")
        return self.epoch

    async def leader_address(self) -> str | None:
        got = await self.store.leader()
        if got is None:
            return None
        return got[0].partition("@")[2] or None

    # ------------------------------------------------------------ agents
    async def register_agent(self, agent_id: str, address: str, inventory: dict[str, Any]
                             ) -> None:
        _safe(agent_id, "agent id")
        if not address:
            raise RequestError("agent address is empty")
        lease = self._agent_leases.get(agent_id)
        if lease is None or not await self.store.refresh(lease):
            lease = await self.store.lease(AGENT_TTL)
            self._agent_leases[agent_id] = lease
        await self.store.register_agent(agent_id, {
            "agent_id": agent_id, "address": address, "inventory": inventory,
            "last_seen": time.time()}, lease)

    def client(self, agent_id: str, address: str) -> AgentClient:
        key = (agent_id, address)
        if key not in self.clients:
            self.clients[key] = AgentClient(agent_id, address, tls=self.config.tls)
        return self.clients[key]

    # ----------------------------------------------------------- planning
    async def start_transaction(self, req: TxnRequest) -> dict[str, Any]:
        """Validate, persist, and start driving a transaction.

        Raises:
            RequestError, NotFoundError, PreconditionError, NotLeaderError,
            StoreUnavailableError.
        """
        epoch = self._require_leader()
        request_id = _safe(req.request_id or f"r{random.getrandbits(64):016x}", "request id")
        for lt in self.live.values():
            if lt.record["request_id"] == request_id:
                return lt.record
        members, addresses = await self._validate(req)
        now = time.time()
        stamp = time.strftime("tx-%Y%m%d-%H%M%S-", time.gmtime(now))
        txn_id = stamp + f"{random.getrandbits(24):06x}"
        record: dict[str, Any] = {
            "txn_id": txn_id, "request_id": request_id, "completion": req.completion,
            "quiesce": req.quiesce, "freeze_timeout": req.freeze_timeout or 10.0,
            "deadline": now + (req.deadline or 3600.0), "speed": req.speed, "created_at": now,
            "members": [{"agent_id": m.agent_id, "vm": m.vm, "disk": m.disk, "mode": m.mode,
                         "chosen": "", "mode_reason": "", "status": "", "done": 0, "total": 0,
                         "outcome": ""} for m in members],
            "agents": dict(sorted(addresses.items())),
            "phase": TxnPhase.CUTTING.value, "decision": "", "reason": "", "committed": [],
            "votes": [], "errors": [], "frozen_from": 0.0, "thawed_at": 0.0, "set_id": "",
            "leader": self.config.name,
        }
        existing = await self.store.create_txn(epoch, record)
        if existing is not None:  # the request id was used already: the same transaction
            if existing in self.live:
                return self.live[existing].record
            stored = await self.store.get_txn(existing)
            if stored is None:
                raise NotFoundError(f"request {request_id} maps to a missing transaction")
            return stored
        lt = self._adopt(record, None)
        self._drive(lt, Begin())
        return record

    async def _validate(self, req: TxnRequest) -> tuple[list[MemberSpec], dict[str, str]]:
        """The members a request names, and each member agent's address."""
        if not req.targets:
            raise RequestError("no targets: name at least one AGENT/VM[/DISK]")
        if req.mode not in MODES:
            raise RequestError(f"mode {req.mode!r} is not one of {', '.join(MODES)}")
        if req.completion not in COMPLETIONS:
            raise RequestError(f"completion {req.completion!r} is not grouped or individual")
        if req.quiesce not in QUIESCES:
            raise RequestError(f"quiesce {req.quiesce!r} is not one of {', '.join(QUIESCES)}")
        if req.deadline < 0:
            raise RequestError(f"deadline {req.deadline:g}s is in the past")
        if req.freeze_timeout < 0 or req.freeze_timeout > 3600:
            raise RequestError(f"freeze timeout {req.freeze_timeout:g}s is not within 0..3600")
        if req.speed < 0:
            raise RequestError("speed is negative")
        entries, live = await self.store.agents()
        agents = {e["agent_id"]: e for e in entries}
        busy = {(m["agent_id"], m["vm"], m["disk"]): lt.txn_id for lt in self.live.values()
                if lt.machine.phase in OPEN for m in lt.record["members"]}
        members: list[MemberSpec] = []
        seen: set[tuple[str, str, str]] = set()
        for target, mode in req.targets:
            parts = target.split("/")
            if len(parts) not in (2, 3):
                raise RequestError(f"target {target!r} is not AGENT/VM or AGENT/VM/DISK")
            for value, what in zip(parts, ("agent id", "VM name", "disk name"), strict=False):
                _safe(value, what)
            mode = mode or req.mode
            if mode not in MODES:
                raise RequestError(f"mode {mode!r} of {target} is not one of {', '.join(MODES)}")
            agent_id, vm = parts[0], parts[1]
            entry = agents.get(agent_id)
            if entry is None:
                raise NotFoundError(f"unknown agent {agent_id!r}")
            if agent_id not in live:
                raise PreconditionError(f"agent {agent_id} is lost (no heartbeat)")
            vms = {v["name"]: v for v in entry["inventory"].get("vms", [])}
            if vm not in vms:
                raise NotFoundError(f"unknown VM {vm!r} on agent {agent_id}")
            if not vms[vm].get("connected", False):
                raise PreconditionError(f"VM {vm} on agent {agent_id} is lost (QEMU unreachable)")
            disks = [d["name"] for d in vms[vm].get("disks", [])]
            if not disks:
                raise PreconditionError(f"VM {vm} on agent {agent_id} has no disk")
            chosen = [parts[2]] if len(parts) == 3 else disks
            for disk in chosen:
                if disk not in disks:
                    raise NotFoundError(f"unknown disk {disk!r} on {agent_id}/{vm}")
                key = (agent_id, vm, disk)
                if key in seen:
                    raise RequestError(f"disk {'/'.join(key)} is named twice")
                if key in busy:
                    raise PreconditionError(
                        f"disk {'/'.join(key)} is in open transaction {busy[key]}")
                seen.add(key)
                members.append(MemberSpec(agent_id, vm, disk, mode))
        if not members:
            raise RequestError("the targets name no disk")
        return members, {a: agents[a]["address"] for a in {m.agent_id for m in members}}

    # ------------------------------------------------------------- driving
    def _adopt(self, record: dict[str, Any], decision: dict[str, Any] | None) -> LiveTxn:
        machine = TxnMachine.recovered(
            record["txn_id"], tuple(record["agents"]), record["completion"] == "grouped",
            record["phase"] == TxnPhase.RUNNING.value,
            Decision(decision["decision"]) if decision else None,
            decision["reason"] if decision else "",
            tuple(decision["committed"]) if decision else ())
        lt = LiveTxn(record, machine)
        self.live[lt.txn_id] = lt
        return lt

    async def _resume_all(self) -> None:
        for record in await self.store.txns():
            if record["phase"] == TxnPhase.DONE.value or record["txn_id"] in self.live:
                continue
            decision = await self.store.get_decision(record["txn_id"])
            lt = self._adopt(record, decision)
            log.info("resuming %s (%s, decision %s)", lt.txn_id, record["phase"],
                     decision and decision["decision"])
            self._drive(lt, Resumed())

    def _drive(self, lt: LiveTxn, first: TxnEvent) -> None:
        lt.events.put_nowait(first)
        lt.task = asyncio.create_task(self._loop(lt), name=f"txn-{lt.txn_id}")

    async def _loop(self, lt: LiveTxn) -> None:
        tasks: set[asyncio.Task[None]] = set()
        timer = asyncio.create_task(self._deadline_timer(lt))
        try:
            while True:
                event = await lt.events.get()
                commands = lt.machine.handle(event)
                lt.machine.validate()
                lt.sync()
                _failpoints(commands)
                for cmd in commands:
                    if isinstance(cmd, Finish):
                        await self._finish(lt)
                        return
                    task = asyncio.create_task(self._execute(lt, cmd))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        except NotLeaderError as err:
            log.warning("txn %s: %s", lt.txn_id, err)
        except Exception:
            log.exception("txn %s: driver failed", lt.txn_id)
            raise
        finally:
            timer.cancel()
            for t in tasks:
                t.cancel()
            if lt.machine.phase == TxnPhase.DONE and self.live.get(lt.txn_id) is lt:
                del self.live[lt.txn_id]  # its final record is in etcd
            lt.changed.set()

    async def _deadline_timer(self, lt: LiveTxn) -> None:
        await asyncio.sleep(max(0.0, lt.record["deadline"] - time.time()))
        lt.events.put_nowait(DeadlinePassed())

    async def _execute(self, lt: LiveTxn, cmd: TxnCommand) -> None:
        try:
            event = await self._run_command(lt, cmd)
        except NotLeaderError as err:
            log.warning("txn %s: deposed: %s", lt.txn_id, err)
            if lt.task:
                lt.task.cancel()
            return
        except Exception as err:  # a bug: keep the transaction alive, record it
            log.exception("txn %s: %r failed", lt.txn_id, cmd)
            lt.record["errors"].append(f"{type(cmd).__name__}: {err}")
            return
        if event is not None:
            lt.events.put_nowait(event)

    def _agent(self, lt: LiveTxn, agent_id: str) -> AgentClient:
        return self.client(agent_id, lt.record["agents"][agent_id])

    async def _run_command(self, lt: LiveTxn, cmd: TxnCommand) -> TxnEvent | None:
        r = lt.record
        if isinstance(cmd, SendCut):
            req = apb.CutRequest(
                txn_id=lt.txn_id, quiesce=QUIESCE_PB[r["quiesce"]],
                freeze_timeout_s=r["freeze_timeout"],
                members=[apb.CutMember(vm=m["vm"], disk=m["disk"], mode=MODE_PB[m["mode"]],
                                       speed=r["speed"]) for m in lt.members_of(cmd.agent_id)])
            try:
                resp = await self._agent(lt, cmd.agent_id).call("Cut", req, retry_for=5)
            except AgentCallError as err:
                return CutReplied(cmd.agent_id, False, err.details or err.code.name)
            for res in resp.members:
                m = lt.member(cmd.agent_id, res.vm, res.disk)
                if m is not None:
                    m["chosen"] = MODE_NAME[res.mode]
                    m["mode_reason"] = res.mode_reason
                    m["total"] = res.bytes_total
            if resp.frozen_at and (not r["frozen_from"] or resp.frozen_at < r["frozen_from"]):
                r["frozen_from"] = resp.frozen_at
            return CutReplied(cmd.agent_id, True)
        if isinstance(cmd, SendThaw):
            try:
                thaw = await self._agent(lt, cmd.agent_id).call(
                    "Thaw", apb.ThawRequest(txn_id=lt.txn_id), retry_for=5)
            except AgentCallError as err:
                return ThawReplied(cmd.agent_id, False, err.details)
            r["thawed_at"] = max(r["thawed_at"], thaw.thawed_at)
            if thaw.thawed_on_own:
                return ThawReplied(cmd.agent_id, False, "thawed on its own: freeze deadline passed")
            return ThawReplied(cmd.agent_id, True)
        if isinstance(cmd, PersistRunning):
            rec = dict(r, phase=TxnPhase.RUNNING.value)
            await self._retry_store(lambda: self.store.put_txn(self._require_leader(), rec))
            return Persisted()
        if isinstance(cmd, SendPrepare):
            progress = asyncio.create_task(self._follow(lt, cmd.agent_id))
            remaining = max(1.0, r["deadline"] - time.time())
            try:
                vote = await self._agent(lt, cmd.agent_id).call(
                    "Prepare", apb.PrepareRequest(txn_id=lt.txn_id, timeout_s=remaining),
                    timeout=remaining + 5, retry_for=remaining)
            except AgentCallError as err:
                return VoteReplied(cmd.agent_id, False, str(err))
            finally:
                progress.cancel()
            for img in vote.images:
                m = lt.member(cmd.agent_id, img.vm, img.disk)
                if m is not None:
                    m["status"], m["done"] = "prepared", img.bytes
            return VoteReplied(cmd.agent_id, vote.yes, vote.reason)
        if isinstance(cmd, WriteDecision):
            body = {"txn_id": lt.txn_id, "decision": cmd.decision.value, "reason": cmd.reason,
                    "committed": list(cmd.committed), "at": time.time(), "by": self.config.name}
            durable = await self._retry_store(
                lambda: self.store.decide(lt.txn_id, body, self._require_leader()))
            return DecisionDurable(Decision(durable["decision"]), durable["reason"],
                                   tuple(durable["committed"]))
        if isinstance(cmd, (SendCommit, SendAbort)):
            return await self._complete(lt, cmd)
        raise AssertionError(f"unknown command {cmd!r}")

    async def _retry_store(self, write: Any) -> Any:
        """Retry an etcd write while etcd is unreachable (quorum lost: wait, bits are safe)."""
        delay = 0.1
        while True:
            try:
                return await write()
            except StoreUnavailableError as err:
                log.warning("etcd unavailable, retrying: %s", err)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def _follow(self, lt: LiveTxn, agent_id: str) -> None:
        """Copy an agent's progress stream into the record (best effort)."""
        with contextlib.suppress(AgentCallError, asyncio.CancelledError):
            async for update in self._agent(lt, agent_id).status(lt.txn_id, 3600):
                for d in update.disks:
                    m = lt.member(agent_id, d.vm, d.disk)
                    if m is not None:
                        m["status"], m["done"], m["total"] = d.job_status, d.bytes_done, \
                            d.bytes_total
                lt.notify()

    async def _complete(self, lt: LiveTxn, cmd: SendCommit | SendAbort) -> TxnEvent:
        client = self._agent(lt, cmd.agent_id)
        delay = 0.2
        while True:  # retried until acknowledged
            try:
                if isinstance(cmd, SendCommit):
                    resp = await client.call("Commit", apb.CommitRequest(txn_id=lt.txn_id))
                    lt.record.setdefault("images", [])
                    for img in resp.images:
                        lt.record["images"].append({
                            "agent_id": cmd.agent_id, "vm": img.vm, "disk": img.disk,
                            "image": img.image, "backing": img.backing,
                            "mode": MODE_NAME[img.mode], "bytes": img.bytes,
                            "size": img.size, "sha256": img.sha256, "cut_at": img.cut_at,
                            "checkpoint": img.checkpoint})
                else:
                    await client.call("Abort", apb.AbortRequest(txn_id=lt.txn_id,
                                                                reason=cmd.reason))
                if isinstance(cmd, SendCommit):
                    failpoints.hit("after_commit_sent")
                outcome = "committed" if isinstance(cmd, SendCommit) else "aborted"
                for m in lt.members_of(cmd.agent_id):
                    m["outcome"] = outcome
                return Acked(cmd.agent_id)
            except AgentCallError as err:
                if not err.retryable:
                    log.error("txn %s: %s", lt.txn_id, err)
                    lt.record["errors"].append(str(err))
                    return Acked(cmd.agent_id)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def _finish(self, lt: LiveTxn) -> None:
        r = lt.record
        backup_set = None
        if lt.machine.decision == Decision.COMMIT and r.get("images"):
            r["set_id"] = lt.txn_id
            backup_set = {
                "set_id": lt.txn_id, "txn_id": lt.txn_id,
                "cut_at": min(i["cut_at"] for i in r["images"]), "images": r["images"],
                "agents": sorted({i["agent_id"] for i in r["images"]}),
                "bytes": sum(i["bytes"] for i in r["images"]),
            }
        await self._retry_store(
            lambda: self.store.put_txn(self._require_leader(), r, backup_set))
        lt.sync()
        log.info("txn %s done: %s %s", lt.txn_id, r["decision"], r["reason"])

    # ---------------------------------------------------------- operations
    async def cancel(self, txn_id: str, reason: str) -> dict[str, Any]:
        """Global abort before the decision.

        Raises:
            NotFoundError, PreconditionError (already committed), NotLeaderError.
        """
        _safe(txn_id, "transaction id")
        self._require_leader()
        lt = self.live.get(txn_id)
        if lt is None:
            record = await self.store.get_txn(txn_id)
            if record is None:
                raise NotFoundError(f"unknown transaction {txn_id}")
            if record["decision"] == Decision.ABORT.value:
                return record
            raise PreconditionError(f"transaction {txn_id} is already {record['decision']}")
        lt.events.put_nowait(CancelRequested(f"cancelled: {reason or 'by request'}"))
        while lt.machine.decision is None and lt.task and not lt.task.done():
            await lt.changed.wait()
        if lt.machine.decision == Decision.COMMIT:
            raise PreconditionError(f"transaction {txn_id} was already decided COMMIT")
        return lt.record

    async def query_decision(self, txn_id: str) -> tuple[str, str]:
        """The durable decision, or presumed abort past the deadline (any replica)."""
        _safe(txn_id, "transaction id")
        decision = await self.store.get_decision(txn_id)
        if decision is None:
            record = await self.store.get_txn(txn_id)
            if record is None:
                raise NotFoundError(f"unknown transaction {txn_id}")
            if time.time() < record["deadline"]:
                return "", ""
            decision = await self.store.decide(txn_id, {
                "txn_id": txn_id, "decision": Decision.ABORT.value,
                "reason": "presumed abort: deadline passed with no decision", "committed": [],
                "at": time.time(), "by": self.config.name}, None)
            lt = self.live.get(txn_id)
            if lt is not None:
                lt.events.put_nowait(DeadlinePassed())
        return decision["decision"], decision["reason"]

    async def get(self, txn_id: str) -> dict[str, Any]:
        _safe(txn_id, "transaction id")
        if txn_id in self.live:
            return self.live[txn_id].record
        record = await self.store.get_txn(txn_id)
        if record is None:
            raise NotFoundError(f"unknown transaction {txn_id}")
        if record["phase"] != TxnPhase.DONE.value:
            decision = await self.store.get_decision(txn_id)
            if decision is not None:
                record["decision"], record["reason"] = decision["decision"], decision["reason"]
        return record

    async def list_txns(self, open_only: bool) -> list[dict[str, Any]]:
        records = {r["txn_id"]: r for r in await self.store.txns()}
        for txn_id, lt in self.live.items():
            records[txn_id] = lt.record
        out = sorted(records.values(), key=lambda r: r["created_at"])
        return [r for r in out if not open_only or r["phase"] != TxnPhase.DONE.value]

    async def watch(self, txn_id: str) -> Any:
        """Yield the record each time it changes, until the transaction is done."""
        while True:
            lt = self.live.get(txn_id)
            if lt is None:
                yield await self.get(txn_id)
                return
            waiter = lt.changed
            yield lt.record
            if lt.machine.phase == TxnPhase.DONE:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), 1.0)

    async def backup_set(self, set_id: str) -> dict[str, Any]:
        _safe(set_id, "set id")
        found = await self.store.get_set(set_id)
        if found is None:
            raise NotFoundError(f"unknown backup set {set_id}")
        return found

    async def _owner(self, agent_id: str) -> AgentClient:
        entries, _ = await self.store.agents()
        entry = next((e for e in entries if e["agent_id"] == agent_id), None)
        if entry is None:
            raise NotFoundError(f"unknown agent {agent_id!r}")
        return self.client(agent_id, entry["address"])

    async def restore(self, set_id: str, target: str, destination: str, fmt: str) -> Any:
        bset = await self.backup_set(set_id)
        parts = target.split("/")
        if len(parts) != 3:
            raise RequestError(f"restore target {target!r} is not AGENT/VM/DISK")
        for value, what in zip(parts, ("agent id", "VM name", "disk name"), strict=True):
            _safe(value, what)
        if not any((i["agent_id"], i["vm"], i["disk"]) == tuple(parts) for i in bset["images"]):
            raise NotFoundError(f"backup set {set_id} has no image of {target}")
        client = await self._owner(parts[0])
        return await client.call("Restore", apb.RestoreRequest(
            set_id=set_id, vm=parts[1], disk=parts[2], destination=destination,
            format=fmt or "raw"), timeout=3600)

    async def verify(self, set_id: str) -> list[tuple[str, bool, str]]:
        bset = await self.backup_set(set_id)
        checks: list[tuple[str, bool, str]] = []
        for agent_id in bset["agents"]:
            client = await self._owner(agent_id)
            try:
                resp = await client.call("Verify", apb.VerifyRequest(set_id=set_id), timeout=3600)
                checks += [(f"{agent_id}:{c.image}", c.ok, c.problem) for c in resp.checks]
            except AgentCallError as err:
                checks.append((f"{agent_id}:*", False, str(err)))
        return checks


def _failpoints(commands: list[TxnCommand]) -> None:
    """Crash here if a failpoint names the step these commands begin."""
    kinds = {type(c) for c in commands}
    for kind, point in ((SendCut, "before_cut"), (SendThaw, "after_cut"),
                        (PersistRunning, "after_thaw"), (SendCommit, "after_decision"),
                        (SendAbort, "after_decision")):
        if kind in kinds:
            failpoints.hit(point)
