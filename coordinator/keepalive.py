"""Lease keepalives from a thread of their own, so that none waits behind the
replica's transaction work: the leader's lease and the lease this replica holds for
each agent it hears.

The keeper runs its own event loop and its own etcd connection in a daemon thread, and
sends every keepalive over ONE LeaseKeepAlive stream it holds open (a stream per
keepalive costs more than the keepalive itself).
The replica's loop never refreshes a lease itself; it says how long a lease is wanted
(``want(lease, until)``): the election every half second while it leads, the registry
at each heartbeat of the agent. The keeper refreshes each wanted lease every quarter of
its TTL (every REFRESH_MOST s at most: a lease's age tells when its agent was last
heard of) until *until* has passed, then lets it expire. So a replica whose loop is busy
keeps its leadership and its agents live, while one whose loop hangs (no ``want`` for
WANT_S) loses them as a dead one would. A lease etcd reports gone is marked dead, and
``alive()`` says so to the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aetcd import rpc as etcd_rpc

from .store import Store

log = logging.getLogger(__name__)
#: something the keeper runs on its loop: given its store, returns how to stop it
Service = Callable[[Store], Awaitable[Callable[[], Awaitable[None]]]]
TICK = 0.2            # the keeper looks for leases due this often
REFRESH_MOST = 2.5    # s between two refreshes of a lease, at most
REPLY_DEADLINE = 4.0  # s for etcd to answer one keepalive (else the stream is opened again)


@dataclass
class _Kept:
    ttl: float
    until: float          # time.monotonic(): refresh until then
    refreshed: float      # time.monotonic() the last refresh etcd confirmed was sent
    warned: bool = False
    alive: bool = True
    busy: bool = False


class LeaseKeeper:
    """Keeps leases alive from its own thread (see the module docstring)."""

    def __init__(self, make_store: Callable[[], Store]) -> None:
        self._make_store = make_store
        self._services: list[Service] = []
        self._leases: dict[int, _Kept] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------ the replica's loop side
    def want(self, lease_id: int, ttl: float, until: float) -> None:
        """Keep lease *lease_id* (granted with *ttl* s) alive until *until*
        (``time.monotonic()``); a later call extends, never shortens."""
        now = time.monotonic()
        with self._lock:
            kept = self._leases.get(lease_id)
            if kept is None:
                self._leases[lease_id] = _Kept(ttl, until, now)
            elif kept.alive:
                kept.until = max(kept.until, until)

    def alive(self, lease_id: int) -> bool:
        """Whether the lease is kept and etcd last confirmed it within its TTL."""
        with self._lock:
            kept = self._leases.get(lease_id)
            return kept is not None and kept.alive and \
                time.monotonic() - kept.refreshed < kept.ttl

    def drop(self, lease_id: int) -> None:
        """Stop keeping *lease_id* (it expires at its TTL unless revoked)."""
        with self._lock:
            self._leases.pop(lease_id, None)

    def serve(self, service: Service) -> None:
        """Before ``start``: run *service* on the keeper's loop (it gets the keeper's
        store and returns how to stop it), e.g. the heartbeat server."""
        self._services.append(service)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------ the keeper's thread
    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        store = self._make_store()
        stops = []
        try:
            for service in self._services:
                try:
                    stops.append(await service(store))
                except OSError as err:  # the replica's loop answers them all instead
                    log.error("lease keeper: a service did not start: %s", err)
            while not self._stopping.is_set():
                try:
                    await self._serve(store)
                except (grpc.RpcError, OSError, TimeoutError, ConnectionError) as err:
                    log.info("lease keepalive stream: %s (opened again)",
                             err.details() if isinstance(err, grpc.aio.AioRpcError)
                             else err or type(err).__name__)
                except Exception:  # a bug or an unexpected client error: never stop keeping
                    log.exception("lease keepalive stream failed (opened again)")
                await asyncio.sleep(TICK)
        finally:
            for stop in stops:
                with contextlib.suppress(Exception):
                    await stop()
            await store.close()

    async def _serve(self, store: Store) -> None:
        """One keepalive stream: a request per due lease, replies read as they come.
        Returns when stopping; raises when the stream breaks or a reply is overdue."""
        call = await asyncio.wait_for(store.client.keepalive_stream(), REPLY_DEADLINE)
        sent: dict[int, float] = {}  # lease id -> when its pending keepalive was sent
        reader = asyncio.create_task(self._read(call, sent))
        try:
            while not self._stopping.is_set():
                if reader.done():
                    reader.result()
                    return
                now = time.monotonic()
                if sent and now - min(sent.values()) > REPLY_DEADLINE:
                    raise TimeoutError(f"no keepalive reply within {REPLY_DEADLINE:g}s")
                for lease_id in self._due():
                    sent[lease_id] = time.monotonic()
                    await asyncio.wait_for(
                        call.write(etcd_rpc.LeaseKeepAliveRequest(ID=lease_id)),
                        REPLY_DEADLINE)
                self._warn_late()
                await asyncio.sleep(TICK)
        finally:
            call.cancel()
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            with self._lock:
                for lease_id in sent:
                    kept = self._leases.get(lease_id)
                    if kept is not None:
                        kept.busy = False

    async def _read(self, call: Any, sent: dict[int, float]) -> None:
        while True:
            reply = await call.read()
            if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
                raise ConnectionError("the keepalive stream ended")
            at = sent.pop(int(reply.ID), None)
            with self._lock:
                kept = self._leases.get(int(reply.ID))
                if kept is None:
                    continue
                kept.busy = False
                if reply.TTL <= 0:
                    kept.alive = False
                elif at is not None:
                    kept.refreshed, kept.warned = at, False
            if reply.TTL <= 0:
                log.info("lease %x: etcd says it expired", int(reply.ID))

    def _due(self) -> list[int]:
        """Leases to refresh now (marked busy); forget those no longer wanted."""
        now = time.monotonic()
        due = []
        with self._lock:
            for lease_id, kept in list(self._leases.items()):
                if now > kept.until + kept.ttl:  # expired by now: forget it
                    del self._leases[lease_id]
                    continue
                if (not kept.alive or kept.busy or now > kept.until
                        or now - kept.refreshed < min(kept.ttl / 4, REFRESH_MOST)):
                    continue
                kept.busy = True
                due.append(lease_id)
        return due

    def _warn_late(self) -> None:
        """Once per lease: a wanted lease with less than half its TTL left."""
        now = time.monotonic()
        late = []
        with self._lock:
            for lease_id, kept in self._leases.items():
                left = kept.refreshed + kept.ttl - now
                if kept.alive and now <= kept.until and left < kept.ttl / 2 and \
                        not kept.warned:
                    kept.warned = True
                    late.append((lease_id, left))
        for lease_id, left in late:
            log.warning("keepalive of lease %x late: %.1fs left", lease_id, max(0.0, left))
