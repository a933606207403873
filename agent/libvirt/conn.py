"""libvirt adapter: one supervised connection per domain, calls with a deadline,
domain events on the agent's loop.

libvirt-python is blocking: every call runs in a worker thread (``asyncio.to_thread``)
under a deadline and raises only the agent's errors. Events (the domain started or
stopped, a job completed, the connection closed) come from libvirt's default event
loop, run by one daemon thread per process, and are handed to the asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import libvirt

from ..errors import AgentError, AgentTimeoutError, QemuError, UnknownError, VmLostError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: libvirt error codes that mean the connection or the running domain is gone.
_LOST = frozenset({
    libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_NO_DOMAIN,
})
_events_lock = threading.Lock()
_events_started = False


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt's default error handler prints every error on stderr."""


def start_event_loop() -> None:
    """libvirt's default event loop in a daemon thread (once per process; before the
    first connection is opened, so that connections get keepalive and events)."""
    global _events_started
    with _events_lock:
        if _events_started:
            return
        libvirt.registerErrorHandler(_quiet, None)  # errors are raised, not printed
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _events_started = True


def error_of(vm: str, what: str, err: libvirt.libvirtError) -> AgentError:
    """The agent's error for a failed libvirt call."""
    code = err.get_error_code()
    text = f"VM {vm}: {what} failed: {err.get_error_message() or err}"
    if code in _LOST:
        return VmLostError(text)
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return AgentTimeoutError(text)
    return QemuError(text)


OnChange = Callable[[], Awaitable[None]]


class DomainConnection:
    """A supervised libvirt connection to one domain (reconnects on its own)."""

    def __init__(self, vm: str, uri: str, domain: str, timeout: float,
                 retry_delay: float = 1.0) -> None:
        self.vm = vm
        self.uri = uri
        self.domain = domain
        self.timeout = timeout
        self.retry_delay = retry_delay
        self.problem = "not connected yet"  # why it is not connected ("" when it is)
        self.fatal: AgentError | None = None  # the first attempt found a config error
        self.on_lost: OnChange | None = None
        self.on_connected: OnChange | None = None
        self.before_connected: OnChange | None = None  # awaited before it counts as connected
        self.on_job_completed: Callable[[dict[str, Any]], None] | None = None
        self._conn: Any = None
        self._dom: Any = None
        self._callbacks: list[int] = []
        self._close_registered = False
        self._activating = False  # before_connected runs: the domain may be used
        self._active = False
        self._connected = asyncio.Event()
        self._closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tried = asyncio.Event()  # the first attempt is over
        self._tasks: set[asyncio.Task[None]] = set()
        # one call at a time on this domain: libvirtd 9.0 segfaulted twice in the tests
        # (an rpc worker, in libc) while calls of this agent overlapped on one domain
        # during an abort (a checkpoint deleted while its XML with sizes was read)
        self._one_call = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def dom(self) -> Any:
        """The domain handle. Raises: VmLostError when not connected."""
        if self._dom is None or not (self.connected or self._activating):
            raise VmLostError(f"VM {self.vm}: libvirt domain {self.domain} is not "
                              f"reachable ({self.problem})")
        return self._dom

    async def call(self, what: str, fn: Callable[..., T], *args: Any,
                   timeout: float | None = None) -> T:
        """Run the blocking libvirt call ``fn(*args)`` in a thread, with a deadline; one
        at a time per domain (waiting for the one before does not count).

        Raises:
            VmLostError, AgentTimeoutError, QemuError.
        """
        limit = self.timeout if timeout is None else timeout
        try:
            async with self._one_call:
                return await asyncio.wait_for(asyncio.to_thread(fn, *args), limit)
        except TimeoutError as err:
            raise AgentTimeoutError(f"VM {self.vm}: {what} did not answer within "
                                    f"{limit:g}s") from err
        except libvirt.libvirtError as err:
            raise error_of(self.vm, what, err) from err

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.create_task(self._supervise(), name=f"libvirt-{self.vm}")

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to *timeout* for the domain to be reachable and running.

        Raises:
            UnknownError, VmLostError: the first attempt found that the URI cannot be
                reached or the domain does not exist (a configuration error).
        """
        try:
            await asyncio.wait_for(self._tried.wait(), timeout)
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            pass
        if self.fatal is not None:
            raise self.fatal
        return self.connected

    async def stop(self) -> None:
        self.on_lost = self.on_connected = self.before_connected = None  # nothing was lost
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._close()

    async def _supervise(self) -> None:
        first = True
        while True:
            try:
                await self._open()
            except AgentError as err:
                self.problem = str(err)
                if first and isinstance(err, (UnknownError, VmLostError)):
                    self.fatal = err
                log.warning("%s", err)
                self._closed.set()
            first = False
            self._tried.set()
            await self._closed.wait()
            await self._close()
            await asyncio.sleep(self.retry_delay)

    async def _open(self) -> None:
        """Open the connection, find the domain, subscribe to its events."""
        start_event_loop()
        self._closed.clear()
        try:
            conn = await self.call("connecting to " + self.uri, libvirt.open, self.uri)
        except AgentError as err:
            cause = err.__cause__
            why = (cause.get_error_message() if isinstance(cause, libvirt.libvirtError)
                   else str(err))
            raise VmLostError(f"VM {self.vm}: cannot reach libvirt at {self.uri}: "
                              f"{why}") from err
        self._conn = conn
        try:
            dom = await self.call("lookup", conn.lookupByName, self.domain)
        except VmLostError as err:
            cause = err.__cause__
            if (isinstance(cause, libvirt.libvirtError)
                    and cause.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN):
                raise UnknownError(f"VM {self.vm}: libvirt domain {self.domain!r} not found "
                                   f"at {self.uri}") from err
            raise
        self._dom = dom
        await self.call("keepalive", conn.setKeepAlive, 5, 3)
        await self.call("close callback", conn.registerCloseCallback, self._on_close, None)
        self._close_registered = True
        for event, cb in ((libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
                          (libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_job)):
            self._callbacks.append(await self.call(
                "event subscription", conn.domainEventRegisterAny, dom, event, cb, None))
        self.fatal = None
        if await self.call("domain state", dom.isActive):
            await self._became_active()
        else:
            self.problem = f"libvirt domain {self.domain} is not running"

    async def _close(self) -> None:
        conn, self._conn, self._dom = self._conn, None, None
        callbacks, self._callbacks = self._callbacks, []
        await self._became_inactive("connection closed")
        if conn is None:
            return
        try:
            for cid in callbacks:
                await self.call("event unsubscription", conn.domainEventDeregisterAny, cid)
            if self._close_registered:
                self._close_registered = False
                await self.call("close callback", conn.unregisterCloseCallback)
            await self.call("disconnect", conn.close)
        except AgentError as err:
            log.debug("VM %s: closing the libvirt connection: %s", self.vm, err)

    async def _became_active(self) -> None:
        if self.connected:
            return
        if self.before_connected is not None:
            self._activating = True
            try:
                await self.before_connected()
            finally:
                self._activating = False
        self.problem = ""
        self._connected.set()
        if self.on_connected is not None:
            await self.on_connected()

    async def _became_inactive(self, why: str) -> None:
        self.problem = why
        if not self.connected:
            return
        self._connected.clear()
        if self.on_lost is not None:
            await self.on_lost()

    # --------------------------------------------- events (libvirt's thread)
    def _soon(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        self._soon(self._closed.set)

    def _on_lifecycle(self, _conn: Any, _dom: Any, event: int, _detail: int,
                      _opaque: Any) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_STARTED:
            self._soon(self._spawn, self._became_active())
        elif event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED):
            self._soon(self._spawn, self._became_inactive(
                f"libvirt domain {self.domain} stopped"))

    def _on_job(self, _conn: Any, _dom: Any, params: dict[str, Any], _opaque: Any) -> None:
        if self.on_job_completed is not None:
            self._soon(self.on_job_completed, dict(params))

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
