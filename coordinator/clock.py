"""The coordinator's clock for the time of a backup set (what retention counts).

It is the wall clock. Tests and the soak run move it forward without waiting:
``BLOCKTXN_CLOCK_FILE=PATH`` names a file that holds an offset in seconds added to
the wall clock (re-read when it changes; absent or unreadable: no offset). Only set
times use it; deadlines and leases always use the wall clock.
"""

from __future__ import annotations

import os
import time

_FILE = os.environ.get("BLOCKTXN_CLOCK_FILE", "")
_seen: tuple[float, float] = (-1.0, 0.0)  # (mtime, offset)


def offset() -> float:
    global _seen
    if not _FILE:
        return 0.0
    try:
        mtime = os.stat(_FILE).st_mtime
        if mtime != _seen[0]:
            with open(_FILE) as f:
                _seen = (mtime, float(f.read().strip() or 0))
    except (OSError, ValueError):
        return 0.0
    return _seen[1]


def now() -> float:
    """Unix time for set times: the wall clock plus the test offset (if any)."""
    return time.time() + offset()
