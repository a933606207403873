"""The QMP connection's view of job states: an event's newer status is never turned
back by a query reply that was already on its way (seen under load: a barrier read
"running" after waiting for "pending", and the agent voted NO)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from qemu.qmp import Message

from blocktxn.agent.backend import JobProgress
from blocktxn.agent.qemu.qmp import VmConnection, _job_event

JOB = "btx0123456789abcdef0123"


class StaleFirst:
    """query-jobs: the first call (sent while the job ran) answers last."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        assert cmd == "query-jobs"
        self.calls += 1
        if self.calls == 1:
            await self.release.wait()
            return [{"id": JOB, "status": "running", "current-progress": 1,
                     "total-progress": 4}]
        return [{"id": JOB, "status": "pending", "current-progress": 4, "total-progress": 4}]


async def _stale_reply_after_event() -> tuple[VmConnection, JobProgress]:
    conn = VmConnection("vm1", "/nonexistent.sock", timeout=5)
    fake = StaleFirst()
    conn._client = fake  # type: ignore[assignment]
    conn._connected.set()
    conn.jobs[JOB] = JobProgress(JOB, "running")
    stale = asyncio.create_task(conn._refresh_jobs())  # asked while the job runs
    await asyncio.sleep(0)
    waiter = asyncio.create_task(conn.wait_job(JOB, {"pending"}, 5))
    await asyncio.sleep(0)
    await conn._job_events([{"id": JOB, "status": "pending"}])  # the event, and its query
    fake.release.set()
    await stale  # the old reply lands last
    return conn, await waiter


def test_a_stale_query_reply_does_not_turn_a_job_back_to_running() -> None:
    conn, seen = asyncio.run(_stale_reply_after_event())
    assert seen.status == "pending"
    assert conn.jobs[JOB].status == "pending"
    assert conn.jobs[JOB].done == 1  # progress still comes from the reply


class CountsQueries:
    """query-jobs answered from a fixed list of jobs, counted."""

    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        self.jobs, self.calls = jobs, 0

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        assert cmd == "query-jobs"
        self.calls += 1
        return self.jobs


def test_events_that_arrive_together_cost_one_query_at_most() -> None:
    """A hundred jobs reaching pending together, then ending: no query-jobs at all when
    QEMU told how each ended (BLOCK_JOB_COMPLETED: progress, error), one for all of them
    when it did not (each query returns every job); every waiter sees its job with its
    progress."""
    ids = [f"btx{n:03d}" for n in range(100)]

    async def run(told: bool) -> tuple[int, list[JobProgress], list[JobProgress]]:
        conn = VmConnection("vm1", "/nonexistent.sock", timeout=5)
        fake = CountsQueries([{"id": j, "status": "concluded", "current-progress": 7,
                               "total-progress": 7} for j in ids])
        conn._client = fake  # type: ignore[assignment]
        conn._connected.set()
        for j in ids:
            conn.jobs[j] = JobProgress(j, "running")

        async def wait_all(status: str) -> list[asyncio.Task[JobProgress]]:
            waiters = [asyncio.create_task(conn.wait_job(j, {status}, 5)) for j in ids]
            while len(conn._changed._waiters) < len(ids):  # every waiter is waiting
                await asyncio.sleep(0)
            return waiters

        pending = await wait_all("pending")
        await conn._job_events([{"id": j, "status": "pending"} for j in ids])
        at_pending = list(await asyncio.gather(*pending))
        concluded = await wait_all("concluded")
        events: list[dict[str, Any]] = []
        for j in ids:
            if told:
                events.append(_job_event(Message({"event": "BLOCK_JOB_COMPLETED", "data": {
                    "device": j, "offset": 7, "len": 7, "type": "backup", "speed": 0}})))
            events.append({"id": j, "status": "concluded"})
        await conn._job_events(events)
        return fake.calls, at_pending, list(await asyncio.gather(*concluded))

    calls, at_pending, ended = asyncio.run(run(told=True))
    assert calls == 0
    assert all(s.status == "pending" for s in at_pending)
    assert all(s.status == "concluded" and s.done == 7 and not s.error for s in ended)
    calls, _, ended = asyncio.run(run(told=False))
    assert calls == 1
    assert all(s.status == "concluded" and s.done == 7 for s in ended)


def test_a_cancelled_job_ends_with_its_error() -> None:
    assert _job_event(Message({"event": "BLOCK_JOB_CANCELLED", "data": {
        "device": JOB, "offset": 1, "len": 4, "type": "backup", "speed": 0}})) == {
        "id": JOB, "ended": {"done": 1, "total": 4, "error": "Operation canceled"}}
    assert _job_event(Message({"event": "BLOCK_JOB_COMPLETED", "data": {
        "device": JOB, "offset": 1, "len": 4, "type": "backup", "speed": 0,
        "error": "Input/output error"}}))["ended"]["error"] == "Input/output error"


def test_a_job_with_two_events_in_one_batch_shows_both() -> None:
    """concluded then null (dismissed) in one batch: the waiter for concluded is woken
    while the job is concluded, before it is forgotten."""
    async def run() -> tuple[JobProgress, bool]:
        conn = VmConnection("vm1", "/nonexistent.sock", timeout=5)
        conn._client = CountsQueries([{"id": JOB, "status": "concluded",  # type: ignore
                                       "current-progress": 3, "total-progress": 3}])
        conn._connected.set()
        conn.jobs[JOB] = JobProgress(JOB, "pending")
        seen: list[JobProgress] = []

        async def wait() -> None:
            seen.append(await conn.wait_job(JOB, {"concluded"}, 5))

        waiter = asyncio.create_task(wait())
        while not conn._changed._waiters:
            await asyncio.sleep(0)
        await conn._job_events([{"id": JOB, "status": "concluded"},
                                {"id": JOB, "status": "null"}])
        await waiter
        return seen[0], JOB in conn.jobs

    seen, kept = asyncio.run(run())
    assert seen.status == "concluded" and seen.done == 3
    assert not kept


def test_the_qmp_client_keeps_no_event() -> None:
    """qemu.qmp's listeners record every event they accept, for ever (a history list,
    and the default all-events listener's queue that nobody reads): a long-lived agent
    grew by every job event (about 67 KiB per transaction in the soak run)."""
    from blocktxn.agent.qemu.qmp import new_client

    async def run() -> tuple[list[str], int]:
        delivered: list[str] = []
        client = new_client("vm1", lambda e: delivered.append(
            str(cast(dict[str, Any], e["data"])["status"])))
        for n in range(1000):
            for status in ("running", "pending", "concluded"):
                await client._event_dispatch(Message(  # what the reader does with an event
                    {"event": "JOB_STATUS_CHANGE", "data": {"id": f"btx{n}", "status": status},
                     "timestamp": {"seconds": 0, "microseconds": 0}}))
            await client._event_dispatch(Message({"event": "BLOCK_JOB_PENDING", "data": {},
                                                  "timestamp": {"seconds": 0,
                                                                "microseconds": 0}}))
        kept = sum(len(x.history) + x._queue.qsize() for x in client._listeners)
        return delivered, kept

    delivered, kept = asyncio.run(run())
    assert len(delivered) == 3000 and delivered[:3] == ["running", "pending", "concluded"]
    assert kept == 0


def stops_at_every_step() -> None:
    """Start a connection and stop it after 0..39 loop steps; every stop() returns. In a
    thread of its own: a stop() that never returns cannot be timed out from inside
    (wait_for's cancel reaches the same swallowing loop)."""
    import threading

    stopped: list[int] = []

    async def run() -> None:
        for steps in range(40):
            conn = VmConnection("vm1", "/nonexistent.sock", timeout=5, retry_delay=0)
            conn.start()
            for _ in range(steps):
                await asyncio.sleep(0)
            await conn.stop()
            stopped.append(steps)

    thread = threading.Thread(target=lambda: asyncio.run(run()), daemon=True)
    thread.start()
    thread.join(30)
    assert stopped == list(range(40)), f"stop() never returned after {len(stopped)} steps"


class FailsAtOnce:
    """A connect that fails at once, as to a VM whose socket is gone."""

    runstate = None

    async def connect(self, address: str) -> None:
        from qemu.qmp import ConnectError
        raise ConnectError("Failed to establish connection", FileNotFoundError(address))

    async def disconnect(self) -> None:
        pass


def test_stop_ends_the_supervisor_whenever_the_cancellation_lands(monkeypatch: Any) -> None:
    """Python 3.11's asyncio.wait_for drops a cancellation that lands just as the
    awaited connect has failed: seen in CI, an agent's SIGTERM never ended it, its
    supervisor kept reconnecting to a VM that was gone. Stop at every step of the loop."""
    from blocktxn.agent.qemu import qmp

    monkeypatch.setattr(qmp, "new_client", lambda name, deliver: FailsAtOnce())

    stops_at_every_step()


class ConnectsAtOnce:
    """A VM that accepts at once and then stays up: the session waits for it to end."""

    def __init__(self) -> None:
        from qemu.qmp.protocol import Runstate
        self.runstate = Runstate.RUNNING
        self._forever = asyncio.Event()

    async def connect(self, address: str) -> None:
        pass

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return []

    async def runstate_changed(self) -> None:
        await self._forever.wait()

    async def disconnect(self) -> None:
        pass


def test_stop_ends_a_session_whenever_the_cancellation_lands(monkeypatch: Any) -> None:
    """The same lost cancellation as the connect succeeds leaves the supervisor in a
    session that lasts as long as the VM: stop() must end it too."""
    from blocktxn.agent.qemu import qmp

    monkeypatch.setattr(qmp, "new_client", lambda name, deliver: ConnectsAtOnce())

    stops_at_every_step()


def test_the_qmp_client_formats_a_message_only_for_a_debug_line(caplog: Any) -> None:
    """qemu.qmp pretty-prints every message it sends or receives before its logger
    drops the line: the agent's client does it only when DEBUG is on."""
    import logging

    from blocktxn.agent.qemu.qmp import new_client

    formatted: list[int] = []

    class Counted(Message):
        def __str__(self) -> str:
            formatted.append(1)
            return super().__str__()

    client = new_client("vm1", lambda e: None)
    msg = Counted({"execute": "query-jobs"})
    assert client._cb_outbound(msg) is msg and client._cb_inbound(msg) is msg
    assert not formatted
    with caplog.at_level(logging.DEBUG, logger=client.logger.name):
        client._cb_outbound(msg)
    assert formatted
