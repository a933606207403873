"""Scheduled backups: a named group of targets with a cron schedule (parsed once at
start), and the pure rule for which occurrence is due.

Cron expressions have croniter's syntax: five fields (minute hour day month weekday),
or six with a seconds field last; evaluated in UTC. Catch-up policy: after a downtime
(no leader, or the leader deposed) only the latest missed occurrence runs, and only if
it is at most ``catch-up`` old (default 1 h; handled within ``ON_TIME`` it is on time
whatever its catch-up); earlier missed ones are skipped, and a latest one older than
that is recorded as missed. A run's request id is derived from the schedule's name and
the occurrence's time, so however leaders change at that moment, an occurrence starts
at most one transaction.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from croniter import croniter

from blocktxn.errors import InvalidInput
from blocktxn.ids import MAX_ID, check_id
from blocktxn.requests import BackupOptions, BackupRequest, Target

from .config import parse_seconds
from .errors import ConfigError

#: Keys of a schedule, as in ``--schedule`` or a ``[schedule.NAME]`` table.
KEYS = ("cron", "targets", "mode", "quiesce", "freeze-timeout", "completion", "group",
        "catch-up", "webhook", "notify")
NOTIFY = ("abort", "all")
CATCH_UP_MAX = 366 * 86400.0
#: s: an occurrence handled this late is on time whatever its catch-up (the leader's loop
#: wakes a little after the occurrence, and a busy one later still)
ON_TIME = 60.0
MAX_SCHEDULES = 1000


@dataclass(frozen=True)
class Schedule:
    name: str
    cron: str
    targets: tuple[str, ...]
    options: BackupOptions
    catch_up: float = 3600.0  # s: how late a missed occurrence may still run
    webhook: str = ""         # POST a JSON summary of each run's outcome here
    notify: str = "abort"     # abort: only aborted/refused/missed runs; all: every run

    def request_id(self, at: float) -> str:
        """The request id of the occurrence at *at* (the same on every replica)."""
        return f"sched-{self.name}-{int(at)}"

    def request(self, at: float) -> BackupRequest:
        return BackupRequest(tuple((t, "") for t in self.targets),
                             BackupOptions(**{**self.options.__dict__,
                                              "request_id": self.request_id(at)}))

    def next_after(self, t: float) -> float:
        """The first occurrence later than *t*."""
        return float(croniter(self.cron, _utc(t)).get_next(float))

    def latest_until(self, t: float) -> float:
        """The last occurrence at or before *t*."""
        prev = float(croniter(self.cron, _utc(t)).get_prev(float))
        at = self.next_after(prev)
        return at if at <= t else prev

    def due(self, last: float, now: float) -> tuple[float | None, float | None]:
        """After the occurrence *last* was handled, at *now*: ``(run, missed)``, the
        occurrence to run now, or the one to record as missed (both None: nothing due)."""
        if self.next_after(last) > now:
            return None, None
        latest = self.latest_until(now)
        if now - latest <= max(self.catch_up, ON_TIME):
            return latest, None
        return None, latest


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def parse_schedule_spec(spec: str) -> Schedule:
    """``NAME=KEY=VALUE;KEY=VALUE...`` (``;`` between keys: cron fields hold spaces,
    targets commas), e.g. ``nightly=cron=0 3 * * *;targets=h1/web,h2/db;quiesce=freeze``.

    Raises: ValueError naming the option and what is wrong.
    """
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise ValueError(f"--schedule {spec!r}: expected NAME=cron=...;targets=...")
    items: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in rest.split(";"))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"--schedule {spec!r}: {part!r} is not KEY=VALUE")
        items[key.strip()] = value.strip()
    return parse_schedule(name.strip(), items)


def parse_schedule(name: str, items: Mapping[str, object]) -> Schedule:
    """One schedule from its keys (a TOML table or a parsed ``--schedule``).

    Raises: ValueError naming the schedule and what is wrong.
    """
    where = f"schedule {name!r}"
    try:
        check_id(name, "schedule name")
        unknown = sorted(set(items) - set(KEYS) - {k.replace("-", "_") for k in KEYS})
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} (keys: {', '.join(KEYS)})")
        get = {k.replace("_", "-"): v for k, v in items.items()}
        cron = str(get.get("cron", ""))
        if not cron or not croniter.is_valid(cron):
            raise ValueError(f"cron {cron!r} is not a valid cron expression (5 fields, or 6 "
                             "with seconds last)")
        try:  # valid, yet it may never fire (30 February)
            croniter(cron, _utc(time.time())).get_next(float)
        except Exception as err:  # croniter's CroniterBadDateError, or worse
            raise ValueError(f"cron {cron!r} never fires ({err})") from err
        if len(f"sched-{name}-{int(time.time()) * 10}") > MAX_ID:  # room for 11 digits
            raise ValueError(f"name too long: its run ids sched-NAME-TIME must fit in "
                             f"{MAX_ID} characters")
        raw = get.get("targets", ())
        listed = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(listed, (list, tuple)):
            raise ValueError("targets must be a list or AGENT/VM[/DISK],...")
        targets = tuple(str(t).strip() for t in listed if str(t).strip())
        if not targets:
            raise ValueError("no targets (targets=AGENT/VM[/DISK],...)")
        for t in targets:
            Target.parse(t)
        options = BackupOptions(
            mode=str(get.get("mode", "auto")), quiesce=str(get.get("quiesce", "none")),
            completion=str(get.get("completion", "grouped")),
            freeze_timeout=float(str(get.get("freeze-timeout", 0.0))),
            group=str(get.get("group", "")))
        options.check()
        seconds = parse_seconds(str(get.get("catch-up", "1h")), "catch-up", 0, CATCH_UP_MAX)
        webhook = str(get.get("webhook", ""))
        parts = urllib.parse.urlsplit(webhook)
        if webhook and (parts.scheme not in ("http", "https") or not parts.hostname
                        or any(c.isspace() for c in webhook)):
            raise ValueError(f"webhook {webhook!r} is not an http(s) URL")
        notify = str(get.get("notify", "abort"))
        if notify not in NOTIFY:
            raise ValueError(f"notify {notify!r} is not one of {', '.join(NOTIFY)}")
    except (ValueError, InvalidInput, ConfigError) as err:
        raise ValueError(f"{where}: {err}") from err
    return Schedule(name, cron, targets, options, seconds, webhook, notify)
