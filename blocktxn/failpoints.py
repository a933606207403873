"""Failpoints: crash the coordinator at an exact protocol step (tests and chaos).

``BLOCKTXN_FAILPOINTS=after_decision=exit,before_cut=exit`` makes the process
exit at once (like SIGKILL: no cleanup, no flush) when it reaches that step.
Unset in production: ``hit()`` is then a dictionary lookup.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

POINTS = ("before_cut", "after_cut", "after_thaw", "after_decision", "after_commit_sent")


def _parse(spec: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        if name not in POINTS or action != "exit":
            raise ValueError(f"bad failpoint {item!r}: NAME=exit with NAME in {POINTS}")
        out[name] = action
    return out


ACTIVE = _parse(os.environ.get("BLOCKTXN_FAILPOINTS", ""))


def hit(name: str) -> None:
    """Act on failpoint *name* if it is armed."""
    if ACTIVE.get(name) == "exit":
        log.warning("failpoint %s: exiting now", name)
        logging.shutdown()
        os._exit(9)
