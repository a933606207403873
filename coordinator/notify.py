"""Webhook notifications of scheduled runs: a JSON POST per outcome, retried with
backoff in the background, never blocking a transaction. Best effort: a replica that
dies with a notification still queued loses it, and a bounded queue drops the oldest
when a webhook stays down."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import logging
import urllib.error
import urllib.request
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

log = logging.getLogger(__name__)

TIMEOUT = 10.0      # s per POST (connect, send, answer); the name lookup has no timeout
#: of its own, so each attempt as a whole is given up TIMEOUT + LOOKUP_SLACK s after it began
LOOKUP_SLACK = 5.0
#: threads for POSTs, apart from the event loop's default executor: a resolver that hangs
#: holds these, never the threads of the replica's other blocking work
POST_THREADS = 4
ATTEMPTS = 6        # over about a minute (1, 2, 4, 8, 16 s between)
MAX_PENDING = 100   # notifications retrying at once; past it the oldest is dropped


class WebhookError(Exception):
    """A POST that did not get a 2xx answer."""


#: what a POST can fail with: no answer (TimeoutError included), a bad answer, a URL
#: http.client refuses
_FAILURES = (WebhookError, OSError, http.client.HTTPException, ValueError)
_pool = concurrent.futures.ThreadPoolExecutor(POST_THREADS, thread_name_prefix="webhook")


class Notifier:
    def __init__(self, attempts: int = ATTEMPTS, first_wait: float = 1.0) -> None:
        self.attempts, self.first_wait = attempts, first_wait
        self._pending: list[asyncio.Task[None]] = []

    def send(self, url: str, body: dict[str, Any]) -> None:
        """Queue one POST of *body* to *url*; returns at once."""
        self._pending = [t for t in self._pending if not t.done()]
        if len(self._pending) >= MAX_PENDING:
            oldest = self._pending.pop(0)
            oldest.cancel()
            log.warning("webhook queue full: dropped the oldest notification")
        self._pending.append(asyncio.create_task(self._post(url, body)))

    async def _post(self, url: str, body: dict[str, Any]) -> None:
        data = json.dumps(body, sort_keys=True).encode()
        try:
            async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(self.attempts),
                    wait=wait_exponential(multiplier=self.first_wait, max=60),
                    retry=retry_if_exception_type(_FAILURES), reraise=True):
                with attempt:
                    posting = asyncio.get_running_loop().run_in_executor(_pool, _post, url, data)
                    await asyncio.wait_for(posting, TIMEOUT + LOOKUP_SLACK)
        except _FAILURES as err:
            log.error("webhook %s: gave up after %d attempts: %s", url, self.attempts, err)

    async def close(self) -> None:
        for task in self._pending:
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        self._pending.clear()


def _post(url: str, data: bytes) -> None:
    """Raises: WebhookError (an answer other than 2xx), OSError (no answer)."""
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as reply:
            status = reply.status
    except urllib.error.HTTPError as err:
        raise WebhookError(f"HTTP {err.code}") from err
    if not 200 <= status < 300:
        raise WebhookError(f"HTTP {status}")
