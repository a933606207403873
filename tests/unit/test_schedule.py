"""Schedules: which occurrence is due (on time, caught up after downtime, or missed),
the request id that makes an occurrence start at most one transaction, and bad
schedules refused at start-up with one line naming the schedule."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry

from blocktxn import failpoints
from blocktxn.coordinator.main import build_parser, config_from_args
from blocktxn.coordinator.metrics import CoordinatorMetrics
from blocktxn.coordinator.notify import Notifier
from blocktxn.coordinator.records import ScheduleState, TxnRecord
from blocktxn.coordinator.schedule import ON_TIME, Schedule, parse_schedule_spec
from blocktxn.coordinator.scheduler import Scheduler, schedule_of
from blocktxn.errors import NotFound
from blocktxn.requests import BackupRequest

DAY = 86400.0


def nightly(catch_up: str = "1h") -> Schedule:
    return parse_schedule_spec(f"nightly=cron=0 3 * * *;targets=h1/web;catch-up={catch_up}")


def test_occurrences_are_utc_and_exact() -> None:
    s = nightly()
    three = 10 * DAY + 3 * 3600
    assert s.next_after(three - 1) == three
    assert s.next_after(three) == three + DAY          # strictly later
    assert s.latest_until(three) == three               # at or before
    assert s.latest_until(three - 0.5) == three - DAY


def test_due_on_time_then_nothing_until_the_next() -> None:
    s = nightly()
    three = 10 * DAY + 3 * 3600
    assert s.due(three - 60, three - 1) == (None, None)
    assert s.due(three - 60, three + 0.2) == (three, None)
    assert s.due(three, three + 5) == (None, None)      # handled: nothing until tomorrow
    assert s.due(three, three + DAY) == (three + DAY, None)


def test_after_downtime_only_the_latest_missed_runs_within_catch_up() -> None:
    s = nightly("2h")
    three = 10 * DAY + 3 * 3600
    # down for three days, back 90 min after the latest occurrence: run that one only
    assert s.due(three - 3 * DAY, three + 5400) == (three, None)
    # back 3 h after it: too late, recorded as missed (no backup at an odd hour)
    assert s.due(three - 3 * DAY, three + 3 * 3600) == (None, three)
    # catch-up 0: on time means within ON_TIME (the loop wakes a little late)
    never = nightly("0")
    assert never.due(three - DAY, three) == (three, None)
    assert never.due(three - DAY, three + 0.5) == (three, None)
    assert never.due(three - DAY, three + ON_TIME + 1) == (None, three)


def test_seconds_field_for_short_periods() -> None:
    s = parse_schedule_spec("fast=cron=* * * * * */5;targets=h1/web")
    assert s.next_after(100.0) == 105.0 and s.latest_until(104.9) == 100.0


def test_request_id_names_schedule_and_occurrence() -> None:
    s = parse_schedule_spec("db-hourly=cron=0 * * * *;targets=h2/db/d0;mode=full")
    rid = s.request_id(7200.0)
    assert rid == "sched-db-hourly-7200" and schedule_of(rid) == "db-hourly"
    request = s.request(7200.0)
    assert request.options.request_id == rid and request.options.mode == "full"
    assert request.targets == (("h2/db/d0", ""),)
    assert schedule_of("r0123") is None and schedule_of("sched-x-notanumber") is None


@pytest.mark.parametrize(("spec", "words"), [
    ("x=cron=61 * * * *;targets=h1/web", "not a valid cron"),
    ("x=cron=* * * * *", "no targets"),
    ("x=cron=* * * * *;targets=h1", "target 'h1'"),
    ("x=cron=* * * * *;targets=h1/w;catch-up=-1", "catch-up"),
    ("x=cron=* * * * *;targets=h1/w;catch-up=400d", "out of range"),
    ("x=cron=* * * * *;targets=h1/w;color=red", "unknown key 'color'"),
    ("x=cron=* * * * *;targets=h1/w;quiesce=hard", "quiesce"),
    ("x=cron=* * * * *;targets=h1/w;webhook=ftp://a", "webhook"),
    ("x=cron=* * * * *;targets=h1/w;notify=never", "notify"),
    ("bad name=cron=* * * * *;targets=h1/w", "schedule name"),
    ("feb30=cron=0 0 30 2 *;targets=h1/w", "never fires"),
    (f"{'n' * 50}=cron=* * * * *;targets=h1/w", "too long"),
])
def test_bad_schedules_are_refused_with_one_line(spec: str, words: str) -> None:
    with pytest.raises(ValueError, match="schedule") as err:
        config_from_args(build_parser().parse_args(["--schedule", spec]))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_catch_up_longer_than_records_are_kept_is_refused() -> None:
    spec = "x=cron=0 3 * * *;targets=h1/w;catch-up=3d"
    with pytest.raises(ValueError, match="keep-finished"):
        config_from_args(build_parser().parse_args(["--schedule", spec,
                                                    "--keep-finished", "1d"]))


def test_a_schedule_named_twice_is_refused() -> None:
    spec = "x=cron=* * * * *;targets=h1/w"
    with pytest.raises(ValueError, match="given twice"):
        config_from_args(build_parser().parse_args(["--schedule", spec, "--schedule", spec]))


def test_schedule_tables_in_the_config_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[schedule.nightly]\ncron = "0 3 * * *"\ntargets = ["h1/web", "h2/db"]\n'
                 'quiesce = "freeze"\ngroup = "web"\nnotify = "all"\n'
                 'webhook = "http://127.0.0.1:9/hook"\n')
    cfg = config_from_args(build_parser().parse_args(["--config", str(f)]))
    (s,) = cfg.schedules
    assert (s.name, s.targets, s.options.quiesce, s.options.group, s.notify) == (
        "nightly", ("h1/web", "h2/db"), "freeze", "web", "all")


def test_a_refused_occurrence_is_not_taken_for_a_started_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The point ``schedule_started`` marks a transaction started and not yet recorded;
    an occurrence the cluster refused (e.g. its agent not registered yet) started none,
    so the point must not be reached (CI saw a leader exit there with no transaction)."""
    schedule = parse_schedule_spec("s=cron=* * * * * */30;targets=h1/vm1")
    written: list[ScheduleState] = []

    class Store:
        async def put_schedule_state(self, epoch: int, state: ScheduleState) -> None:
            written.append(state)

    async def refuse(request: BackupRequest) -> TxnRecord:
        raise NotFound("unknown agent h1")

    async def tick() -> None:
        scheduler = Scheduler([schedule], cast(Any, Store()), refuse, lambda: 1,
                              CoordinatorMetrics(CollectorRegistry()), Notifier())
        scheduler.states = {"s": ScheduleState("s", 0.0, "created", handled_at=0.0)}
        await scheduler._tick(schedule, 90.0)

    monkeypatch.setitem(failpoints.ACTIVE, "schedule_started", "fail")
    asyncio.run(tick())
    assert [(s.last_at, s.outcome, s.txn_id) for s in written] == [(90.0, "refused", "")]
