"""QMP adapter: one supervised connection per VM, job tracking from QMP events.

Generic QMP only (connect, execute, jobs, the disk graph); the backup steps are in
``blockjobs.py``.

The connection reconnects on its own when QEMU comes back; every command has a
deadline; job states are kept current from JOB_STATUS_CHANGE events so waiting
for a job never polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import replace
from typing import Any, TypeVar, cast

from qemu.qmp import EventListener, ExecuteError, Message, QMPClient, QMPError, Runstate
from qemu.qmp.models import ErrorResponse
from qemu.qmp.protocol import require
from qemu.qmp.qmp_client import BadReplyError

from ..backend import NODE_PREFIX, Checkpoint, Disk, JobProgress
from ..errors import AgentTimeoutError, QemuError, VmLostError

T = TypeVar("T")
log = logging.getLogger(__name__)


#: Drivers that make a node a disk (a format node) rather than a protocol or filter.
FORMAT_DRIVERS = frozenset(
    {"qcow2", "raw", "qed", "vmdk", "vdi", "vhdx", "vpc", "luks", "parallels", "qcow"}
)


OnConnection = Callable[["VmConnection"], Awaitable[None]]


#: The events the connection follows: a job's status, and how a block job ended (its
#: progress and error; QEMU sends it just before the job's status becomes concluded).
JOB_EVENTS = ("JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")


class _Deliver(EventListener):
    """Hands each job event (JOB_EVENTS) to *deliver* and keeps nothing: a listener that
    accepts an event records it in a history list for ever."""

    def __init__(self, deliver: Callable[[Message], None]) -> None:
        super().__init__(JOB_EVENTS)
        self._deliver = deliver

    def accept(self, event: Message) -> bool:
        if super().accept(event):
            self._deliver(event)
        return False


class _QuietClient(QMPClient):
    """qemu.qmp's client without its per-message debug line: the library formats every
    message it sends or receives (``json.dumps(..., indent=2)``) before the logger
    decides to drop the line, which cost an agent more CPU than everything else it does
    for a zero-change incremental (a ``query-named-block-nodes`` reply of 100 disks is
    hundreds of kB pretty-printed). The lines still come when DEBUG is on for its
    logger."""

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._cb_outbound(msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._cb_inbound(msg)
        return msg

    _sent = 0

    @require(Runstate.RUNNING)
    async def execute(self, cmd: str, arguments: Mapping[str, object] | None = None,
                      oob: bool = False) -> object:
        """``QMPClient.execute`` serialising the command once (the library serialises
        it three times: when it makes the message, when it copies it, and after it
        adds the id), with ids of our own (``btx#N``). Raises what it raises:
        ExecuteError, BadReplyError, ExecInterruptedError."""
        self._sent += 1
        body: dict[str, object] = {"exec-oob" if oob else "execute": cmd,
                                   "id": f"{NODE_PREFIX}#{self._sent}"}
        if arguments is not None:
            body["arguments"] = arguments
        msg = Message(body, eager=False)
        reply = await self._execute(msg, assign_id=False)
        if "error" in reply:
            try:
                error = ErrorResponse(reply)
            except (KeyError, TypeError) as err:
                raise BadReplyError("QMP error reply is malformed", reply, msg) from err
            raise ExecuteError(error, msg, reply)
        if "return" not in reply:
            raise BadReplyError("QMP reply is missing a 'error' or 'return' member",
                                reply, msg)
        return reply["return"]


def new_client(name: str, deliver: Callable[[Message], None]) -> QMPClient:
    """A QMP client for one VM that hands job events to *deliver* and keeps no event.
    (qemu.qmp's default all-events listener queues every event until someone reads it,
    and every listener keeps a history of what it accepted: an agent that runs for a
    year must not grow by each job event.)"""
    client = _QuietClient(f"blocktxn-{name}")
    client.events.event_filter = lambda event: False
    client.register_listener(_Deliver(deliver))
    return client


class VmConnection:
    """A supervised QMP session to one VM."""

    def __init__(
        self, name: str, socket_path: str, *, timeout: float = 10.0, retry_delay: float = 0.3
    ) -> None:
        self.name = name
        self.socket_path = socket_path
        self.timeout = timeout
        self.retry_delay = retry_delay
        self.jobs: dict[str, JobProgress] = {}
        self._events = 0  # JOB_STATUS_CHANGE events seen
        self._changed_at: dict[str, int] = {}  # job id -> number of its latest event
        self._ended: set[str] = set()  # jobs whose end (progress, error) an event told
        self.generation = 0  # bumps on every (re)connect: a new QEMU loses jobs
        self._client: QMPClient | None = None
        self._connected = asyncio.Event()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.on_lost: OnConnection | None = None
        self.on_connected: OnConnection | None = None

    # ------------------------------------------------------------ lifecycle
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"qmp-{self.name}")

    async def stop(self) -> None:
        """End the session and its supervisor. The supervisor also checks a flag: a
        cancellation can be lost (Python 3.11's wait_for drops one that lands just as
        the awaited connect has failed or succeeded), and the loop would then reconnect,
        or sit in a session, for ever: it is cancelled until it ends."""
        self._stopping = True
        task = self._task
        while task is not None and not task.done():  # again, should one be lost
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        await self._drop_client()

    async def wait_connected(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        return self.connected

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 2.0)

    async def _supervise(self) -> None:
        while not self._stopping:
            events: asyncio.Queue[Message] = asyncio.Queue()
            client = new_client(self.name, events.put_nowait)
            try:
                await asyncio.wait_for(client.connect(self.socket_path), self.timeout)
            except (QMPError, OSError, TimeoutError) as err:
                log.debug("vm %s: connect failed: %s", self.name, err)
                with contextlib.suppress(Exception):
                    await client.disconnect()
                if not self._stopping:
                    await asyncio.sleep(self.retry_delay)
                continue
            self._client = client
            pump = asyncio.create_task(self._pump(events))
            try:
                await self._refresh_jobs()
                self.generation += 1
                self._connected.set()
                log.info("vm %s: QMP connected (%s)", self.name, self.socket_path)
                if self.on_connected:
                    await self.on_connected(self)
                while client.runstate == Runstate.RUNNING:
                    await client.runstate_changed()
            except (QMPError, OSError, QemuError) as err:
                log.warning("vm %s: session failed: %s", self.name, err)
            finally:
                pump.cancel()
                self._connected.clear()
                self.jobs.clear()
                self._ended.clear()
                await self._drop_client()
                async with self._changed:
                    self._changed.notify_all()
            log.warning("vm %s: QMP connection lost", self.name)
            if self.on_lost:
                await self.on_lost(self)
            await asyncio.sleep(self.retry_delay)

    async def _pump(self, events: asyncio.Queue[Message]) -> None:
        while True:  # (the queue is read as fast as events come: it stays short)
            batch = [await events.get()]
            while not events.empty():
                batch.append(events.get_nowait())
            await self._job_events([_job_event(e) for e in batch])

    async def _job_events(self, batch: list[dict[str, Any]]) -> None:
        """Job events that arrived together (see ``_job_event``): each job's status now
        and, once it ended, its progress and error; then ONE full query if a job
        concluded without telling how it ended (a block job always does; a query per
        event cost a query of every job per job event: with a hundred jobs, ten thousand
        job entries parsed for one transaction); then the waiters are woken. A job with
        a second status in the batch first has its earlier one delivered, so a waiter
        still sees every status a job passed through, as with one event at a time."""
        touched: set[str] = set()
        query = False
        for data in batch:
            job_id = str(data.get("id", ""))
            if not job_id.startswith(NODE_PREFIX):
                continue
            self._events += 1
            self._changed_at[job_id] = self._events
            ended = data.get("ended")
            if ended is not None:  # how it ended; its status (concluded) comes next
                old = self.jobs.get(job_id)
                self.jobs[job_id] = JobProgress(
                    job_id, old.status if old is not None else "", int(ended["done"]),
                    int(ended["total"]), str(ended["error"]))
                self._ended.add(job_id)
                continue
            if job_id in touched:
                await self._deliver(query)
                await asyncio.sleep(0)  # the woken waiters see this status first
                touched.clear()
                query = False
            touched.add(job_id)
            status = str(data.get("status", ""))
            job = self.jobs.setdefault(job_id, JobProgress(job_id, status))
            job.status = status
            query = query or (status == "concluded" and job_id not in self._ended)
        if touched:
            await self._deliver(query)

    async def _deliver(self, query: bool) -> None:
        """Refresh the jobs (with *query*), forget the ones gone (status null), wake
        whoever waits on a job."""
        if query:
            with contextlib.suppress(QemuError, AgentTimeoutError):
                await self._refresh_jobs()
        for job_id in [j for j, job in self.jobs.items() if job.status == "null"]:
            del self.jobs[job_id]
        self._ended &= self.jobs.keys()
        async with self._changed:
            self._changed.notify_all()

    # -------------------------------------------------------------- commands
    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        """Run one QMP command with a deadline.

        Raises:
            VmLostError: not connected. QemuError: QEMU refused the command.
            AgentTimeoutError: no answer within the deadline.
        """
        client = self._client
        if client is None or not self.connected:
            raise VmLostError(f"VM {self.name} is not connected")
        try:
            return await asyncio.wait_for(_awaited(client.execute(cmd, args)),
                                          timeout or self.timeout)
        except ExecuteError as err:
            raise QemuError(f"{self.name}: {cmd}: {err}") from err
        except TimeoutError as err:
            raise AgentTimeoutError(f"{self.name}: {cmd}: no answer from QEMU") from err
        except (QMPError, OSError, EOFError) as err:
            raise VmLostError(f"{self.name}: {cmd}: connection lost ({err})") from err

    async def _refresh_jobs(self) -> None:
        client = self._client
        if client is None:
            return
        asked = self._events
        try:
            raw = await asyncio.wait_for(_awaited(client.execute("query-jobs")), self.timeout)
        except (QMPError, OSError, TimeoutError) as err:
            raise QemuError(f"{self.name}: query-jobs: {err}") from err
        # A reply that was on its way while an event told of a newer status must not
        # turn that status back (the caller may resume after the event's handler).
        newer = {j for j, at in self._changed_at.items() if at > asked}
        seen = set()
        for j in raw:  # type: ignore[attr-defined]
            job_id = str(j["id"])
            if not job_id.startswith(NODE_PREFIX):
                continue
            seen.add(job_id)
            old = self.jobs.get(job_id)
            if old is not None and job_id in newer and job_id in self._ended:
                continue  # it ended after the query was sent: the event tells more
            status = old.status if old is not None and job_id in newer else j["status"]
            self.jobs[job_id] = JobProgress(
                job_id, status, int(j.get("current-progress", 0)),
                int(j.get("total-progress", 0)), str(j.get("error", "")) or
                (old.error if old is not None and job_id in newer else ""))
        for gone in set(self.jobs) - seen - newer:
            del self.jobs[gone]
        for j in list(self._changed_at):
            if j not in self.jobs and j not in newer:
                del self._changed_at[j]

    async def refresh_jobs(self) -> dict[str, JobProgress]:
        """Current state of this agent's jobs (progress needs a query)."""
        if self.connected:
            await self._refresh_jobs()
        return self.jobs

    async def wait_job(self, job_id: str, statuses: set[str], timeout: float | None) -> JobProgress:
        """Wait until *job_id* reaches one of *statuses* (or concludes).

        Raises:
            VmLostError: the VM went away. QemuError: the job vanished.
            AgentTimeoutError: not reached within *timeout*.
        """
        generation = self.generation

        seen: list[JobProgress | None] = []  # the state that met the condition

        def ready() -> bool:
            if not self.connected or self.generation != generation:
                return True
            job = self.jobs.get(job_id)
            if job is None or job.status in statuses or job.status == "concluded":
                seen[:] = [None if job is None else replace(job)]
                return True
            return False

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout)
            except TimeoutError as err:
                raise AgentTimeoutError(
                    f"{self.name}: job {job_id} not {sorted(statuses)} in time"
                ) from err
        if not seen:
            raise VmLostError(f"VM {self.name} went away while job {job_id} ran")
        if seen[0] is None:
            raise QemuError(f"{self.name}: job {job_id} vanished")
        return seen[0]

    # ------------------------------------------------------------- inventory
    async def disks(self) -> dict[str, Disk]:
        """The VM's disks: top-level format nodes not created by this agent.

        Raises:
            VmLostError, QemuError, AgentTimeoutError.
        """
        nodes = await self.execute("query-named-block-nodes", {"flat": True})
        graph = await self.execute("x-debug-query-block-graph")
        by_id = {n["id"]: n for n in graph["nodes"]}
        drv_of = {n["node-name"]: n["drv"] for n in nodes}
        has_format_parent: set[str] = set()
        for edge in graph["edges"]:
            parent, child = by_id.get(edge["parent"]), by_id.get(edge["child"])
            if not parent or not child or parent["type"] != "block-driver":
                continue
            # Only a known format driver above makes a node a backing file rather than a
            # disk: a filter above (e.g. a running backup's copy-before-write node, which is
            # implicit and absent from query-named-block-nodes) does not.
            if drv_of.get(parent["name"]) in FORMAT_DRIVERS:
                has_format_parent.add(child["name"])
        result: dict[str, Disk] = {}
        for n in nodes:
            name = n["node-name"]
            if (
                name.startswith(("#", NODE_PREFIX))
                or n["drv"] not in FORMAT_DRIVERS
                or name in has_format_parent
            ):
                continue
            bitmaps = tuple(
                Checkpoint(
                    b["name"], bool(b.get("recording")), bool(b.get("persistent")),
                    bool(b.get("inconsistent")), bool(b.get("busy")), int(b.get("count", 0)),
                    int(b.get("granularity", 0)),
                )
                for b in n.get("dirty-bitmaps", [])
                if "name" in b  # jobs add anonymous bitmaps of their own
            )
            size = int(n["image"]["virtual-size"])
            result[name] = Disk(name, size, n["drv"], bitmaps,
                                int(n["image"].get("actual-size", size)))
        return result

    async def commands(self) -> set[str]:
        """Names of the QMP commands this QEMU offers."""
        return {c["name"] for c in await self.execute("query-commands")}

    async def node_names(self) -> set[str]:
        nodes = await self.execute("query-named-block-nodes", {"flat": True})
        return {n["node-name"] for n in nodes}


def _job_event(event: Message) -> dict[str, Any]:
    """A job event as ``_job_events`` takes it: JOB_STATUS_CHANGE's data ({id, status});
    BLOCK_JOB_COMPLETED or _CANCELLED as {id, ended: {done, total, error}} (what
    query-jobs would say of the concluded job)."""
    data = cast(dict[str, Any], event["data"] if "data" in event else {})
    if event["event"] == "JOB_STATUS_CHANGE":
        return data
    error = str(data.get("error", "")) or (
        "Operation canceled" if event["event"] == "BLOCK_JOB_CANCELLED" else "")
    return {"id": data.get("device", ""), "ended": {
        "done": data.get("offset", 0), "total": data.get("len", 0), "error": error}}


def _awaited(command: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """*command* run to its reply even if its caller stops waiting (a deadline, a
    cancelled RPC): QEMU runs a QMP command to its end anyway, and a reply nobody
    awaits makes the QMP library log "Unknown ID ..., message dropped". Its outcome
    is then dropped here, quietly."""
    task = asyncio.ensure_future(command)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return asyncio.shield(task)
