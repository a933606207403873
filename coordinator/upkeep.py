"""What keeps etcd small and watched while a replica runs, without an operator: the
leader collects finished transaction records older than ``--keep-finished``; every
replica reports a full etcd (its NOSPACE alarm) through gRPC health as NOT_SERVING,
with the reason in one ERROR log line and in the health reply's trailing metadata."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from grpc_health.v1 import _async as health_aio  # public alias: health.aio
from grpc_health.v1 import health_pb2

from .config import parse_seconds
from .errors import NotLeaderError, StoreRejectedError, StoreUnavailableError
from .store import FULL_HINT, Store

log = logging.getLogger(__name__)

KEEP_DEFAULT = 7 * 86400.0
KEEP_MIN, KEEP_MAX = 1.0, 3650 * 86400.0
COLLECT_EVERY = 60.0       # seconds between two passes of the collector (at most)
COLLECT_LIMIT = 1000       # records read per pass
SPACE_EVERY = 5.0          # seconds between two looks at etcd's alarms
REASON_KEY = "blocktxn-reason"  # trailing metadata of a NOT_SERVING health reply


def parse_keep(text: str, option: str = "--keep-finished") -> float:
    """``--keep-finished``: seconds, or a number with a unit s, h, d or w (``12h``,
    ``7d``), within KEEP_MIN..KEEP_MAX.

    Raises:
        ConfigError: anything else.
    """
    return parse_seconds(text, option, KEEP_MIN, KEEP_MAX)


class Health(health_aio.HealthServicer):  # type: ignore[misc]  # untyped base
    """gRPC health whose NOT_SERVING replies carry the reason (trailing metadata
    ``blocktxn-reason``); ``report`` sets every service this server announced."""

    def __init__(self) -> None:
        super().__init__()
        self.reason = ""
        self._services: set[str] = {""}

    async def set(self, service: str,
                  status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        self._services.add(service)
        await super().set(service, status)

    async def report(self, reason: str) -> None:
        """NOT_SERVING with *reason*, or SERVING when *reason* is empty."""
        self.reason = reason
        status = (health_pb2.HealthCheckResponse.NOT_SERVING if reason
                  else health_pb2.HealthCheckResponse.SERVING)
        for service in sorted(self._services):
            await super().set(service, status)

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any
                    ) -> health_pb2.HealthCheckResponse:
        if self.reason:
            context.set_trailing_metadata(((REASON_KEY, self.reason),))
        reply: health_pb2.HealthCheckResponse = await super().Check(request, context)
        return reply


async def watch_space(store: Store, health: Health, every: float = SPACE_EVERY) -> None:
    """Every *every* seconds, ask etcd for its alarms (a status read: no raft round,
    no revision); NOT_SERVING while one is raised, SERVING again once it is cleared.
    One ERROR line when it is raised; etcd not answering changes nothing here. An etcd
    that refuses the coordinator's requests (wrong credentials, no permission) is
    NOT_SERVING too, with etcd's reason, until it answers."""
    while True:
        try:
            status = await store.status()
        except StoreUnavailableError as err:
            log.debug("etcd status: %s", err)
        except StoreRejectedError as err:
            reason = f"etcd refuses the coordinator's requests: {err}"
            if health.reason != reason:
                log.error("health NOT_SERVING: %s", reason)
                await health.report(reason)
        else:
            if status.alarms and not health.reason.startswith(FULL_HINT):
                reason = (f"{FULL_HINT}; alarm {', '.join(status.alarms)}; database "
                          f"{status.db_size / 2**20:.1f} MiB")
                log.error("health NOT_SERVING: %s", reason)
                await health.report(reason)
            elif not status.alarms and health.reason:
                log.warning("etcd answers and has no alarm: health SERVING")
                await health.report("")
        await asyncio.sleep(every)


async def collect_forever(store: Store, epoch_of: Callable[[], int | None], keep: float,
                          every: float = COLLECT_EVERY, keep_audit: float = 90 * 86400.0,
                          most_audit: int = 100_000) -> None:
    """While this replica leads: every *every* seconds (or half of *keep*, if shorter),
    delete finished transaction records created more than *keep* seconds ago
    (``Store.collect_finished``: fenced, bounded batches; backup sets stay)."""
    period = min(every, max(1.0, keep / 2))
    while True:
        await asyncio.sleep(period)
        epoch = epoch_of()
        if epoch is None:
            continue
        try:
            gone = await store.collect_finished(epoch, time.time() - keep, COLLECT_LIMIT)
        except (StoreUnavailableError, NotLeaderError) as err:
            log.warning("collecting finished transactions: %s", err)
            continue
        except Exception:  # never stop collecting: etcd would grow without bound
            log.exception("collecting finished transactions failed; trying again later")
            continue
        if gone:
            log.info("collected %d finished transaction record(s) older than %gs",
                     gone, keep)
        try:
            gone = await store.collect_audit(epoch, time.time() - keep_audit, most_audit)
        except (StoreUnavailableError, NotLeaderError) as err:
            log.warning("collecting audit records: %s", err)
            continue
        except Exception:
            log.exception("collecting audit records failed; trying again later")
            continue
        if gone:
            log.info("collected %d audit record(s) (older than %gs, or past the newest %d)",
                     gone, keep_audit, most_audit)


def start(store: Store, health: Health, epoch_of: Callable[[], int | None], keep: float,
          keep_audit: float = 90 * 86400.0) -> Callable[[], Awaitable[None]]:
    """Run both loops; return the coroutine function that stops them."""
    tasks = [asyncio.create_task(watch_space(store, health), name="etcd space"),
             asyncio.create_task(collect_forever(store, epoch_of, keep,
                                                 keep_audit=keep_audit), name="collector")]

    async def stop() -> None:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return stop
