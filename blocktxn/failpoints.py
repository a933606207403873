"""Failpoints: make a daemon fail at an exact protocol step (tests and chaos only).

Two ways to arm them, both unset in production (``hit()`` is then one dictionary
lookup and one environment lookup):

- ``BLOCKTXN_FAILPOINTS=after_decision=exit,before_cut=exit`` at process start;
- ``BLOCKTXN_FAILPOINT_FILE=PATH``: the file holds the same ``NAME=ACTION`` list
  and is read again whenever it changes, so a test arms and disarms points while
  the daemon runs (write the file; remove it to disarm).

Actions: ``exit`` ends the process at once (like SIGKILL: no cleanup, no flush);
``fail`` raises :class:`FailpointError` (a Conflict: FAILED_PRECONDITION on the
wire, a non-retryable refusal) every time the point is reached while armed;
``delay`` makes an asynchronous step wait ``DELAY`` seconds (``await pause(NAME)``:
a step made slow without blocking the daemon); ``block`` blocks the thread that reaches
the point for ``BLOCK`` seconds (``hit(NAME)``: a long synchronous stretch of work that
holds up the daemon's event loop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from .errors import Conflict

log = logging.getLogger(__name__)

POINTS = (
    # coordinator
    "before_stage", "before_cut", "after_cut", "after_thaw", "after_decision", "after_commit_sent",
    "lose_create_reply", "schedule_started",
    # agent
    "agent_commit", "agent_after_rebase", "agent_after_delete", "agent_create_image",
    "agent_inventory", "agent_backup_begin",
)
ACTIONS = ("exit", "fail", "delay", "block")
DELAY = 1.5  # seconds
BLOCK = 30.0  # seconds: longer than an agent may stay silent before it is lost


class FailpointError(Conflict):
    """An armed ``fail`` failpoint was reached."""


def parse(spec: str) -> dict[str, str]:
    """``NAME=ACTION,...`` → {name: action}.

    Raises:
        ValueError: an unknown point or action.
    """
    out = {}
    for item in filter(None, (s.strip() for s in spec.replace("\n", ",").split(","))):
        name, _, action = item.partition("=")
        if name not in POINTS or action not in ACTIONS:
            raise ValueError(f"bad failpoint {item!r}: NAME=ACTION with NAME in {POINTS} "
                             f"and ACTION in {ACTIONS}")
        out[name] = action
    return out


ACTIVE = parse(os.environ.get("BLOCKTXN_FAILPOINTS", ""))
_FILE = os.environ.get("BLOCKTXN_FAILPOINT_FILE", "")
_seen: tuple[float, dict[str, str]] = (-1.0, {})


def _from_file() -> dict[str, str]:
    global _seen
    try:
        mtime = os.stat(_FILE).st_mtime
    except OSError:
        return {}
    if mtime != _seen[0]:
        try:
            with open(_FILE) as f:
                _seen = (mtime, parse(f.read()))
        except (OSError, ValueError) as err:
            log.error("failpoint file %s ignored: %s", _FILE, err)
            _seen = (mtime, {})
    return _seen[1]


def hit(name: str) -> None:
    """Act on failpoint *name* if it is armed.

    Raises:
        FailpointError: the point is armed with ``fail``.
    """
    action = _action(name)
    if action == "exit":
        log.warning("failpoint %s: exiting now", name)
        logging.shutdown()
        os._exit(9)
    if action == "fail":
        log.warning("failpoint %s: failing", name)
        raise FailpointError(f"failpoint {name}")
    if action == "block":
        log.warning("failpoint %s: blocking for %gs", name, BLOCK)
        time.sleep(BLOCK)


async def pause(name: str) -> None:
    """Wait ``DELAY`` seconds if failpoint *name* is armed with ``delay``."""
    if _action(name) == "delay":
        log.warning("failpoint %s: waiting %gs", name, DELAY)
        await asyncio.sleep(DELAY)


def _action(name: str) -> str | None:
    return ACTIVE.get(name) or (_from_file().get(name) if _FILE else None)
