"""Retention policies: restic ``forget`` semantics plus "keep the newest set of each
disk", and the policy parser's refusals."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from blocktxn.errors import InvalidInput
from blocktxn.retention import (
    DAY,
    HOUR,
    MAX_COUNT,
    Policy,
    PolicyError,
    SetInfo,
    Verdict,
    parse_duration,
    plan,
)

NO_DISKS: frozenset[str] = frozenset()


def at(text: str) -> float:
    """Unix time of ``"YYYY-MM-DD HH:MM[:SS]"`` in UTC."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def sets_at(*times: str, disks: frozenset[str] = NO_DISKS) -> list[SetInfo]:
    """One set per time, id ``s<time>``; no disks unless given, so only the policy's
    rules keep anything."""
    return [SetInfo(f"s{t}", at(t), disks) for t in times]


def kept(verdicts: list[Verdict]) -> dict[str, tuple[str, ...]]:
    """Kept set id -> reasons, newest first."""
    return {v.set_id: v.reasons for v in verdicts if v.keep}


# --- restic-equivalent scenarios (expectations computed by hand) -------------------


def test_keep_last_keeps_the_n_newest_and_numbers_them() -> None:
    sets = sets_at("2026-11-26 10:00", "2026-11-27 10:00", "2026-11-28 10:00",
                   "2026-11-29 10:00", "2026-11-30 10:00")
    verdicts = plan(sets, Policy(keep_last=3))
    assert [v.set_id for v in verdicts] == [
        "s2026-11-30 10:00", "s2026-11-29 10:00", "s2026-11-28 10:00",
        "s2026-11-27 10:00", "s2026-11-26 10:00"]          # newest first
    assert [(v.keep, v.reasons) for v in verdicts] == [
        (True, ("last 1",)), (True, ("last 2",)), (True, ("last 3",)),
        (False, ()), (False, ())]


def test_keep_daily_keeps_the_newest_of_each_of_the_last_n_days() -> None:
    sets = sets_at("2026-11-27 12:00",
                   "2026-11-28 10:00", "2026-11-28 18:00",
                   "2026-11-29 09:00", "2026-11-29 21:00",
                   "2026-11-30 08:00", "2026-11-30 23:00")
    assert kept(plan(sets, Policy(keep_daily=3))) == {
        "s2026-11-30 23:00": ("daily 2026-11-30",),
        "s2026-11-29 21:00": ("daily 2026-11-29",),
        "s2026-11-28 18:00": ("daily 2026-11-28",),
    }


def test_a_rule_with_counts_left_also_keeps_the_oldest_set() -> None:
    # restic >= 0.17: 3 dailies wanted, only 2 days exist: the oldest set is kept
    # too, although its day already has a (newer) daily.
    sets = sets_at("2026-11-29 10:00", "2026-11-29 20:00",
                   "2026-11-30 10:00", "2026-11-30 20:00")
    assert kept(plan(sets, Policy(keep_daily=3))) == {
        "s2026-11-30 20:00": ("daily 2026-11-30",),
        "s2026-11-29 20:00": ("daily 2026-11-29",),
        "s2026-11-29 10:00": ("oldest daily 2026-11-29",),
    }
    # ... but not once the count is used up
    assert "s2026-11-29 10:00" not in kept(plan(sets, Policy(keep_daily=2)))


def test_keep_hourly_buckets_by_hour() -> None:
    sets = sets_at("2026-11-30 09:10", "2026-11-30 09:50", "2026-11-30 10:05",
                   "2026-11-30 10:55", "2026-11-30 11:00")
    assert kept(plan(sets, Policy(keep_hourly=2))) == {
        "s2026-11-30 11:00": ("hourly 2026-11-30T11",),
        "s2026-11-30 10:55": ("hourly 2026-11-30T10",),
    }


def test_keep_weekly_uses_iso_weeks_across_new_year() -> None:
    # 2027-01-01 (Fri) and 2027-01-03 (Sun) belong to ISO week 2026-W53; 2027-W01
    # starts on Monday 2027-01-04.
    sets = sets_at("2026-12-24 12:00",    # 2026-W52
                   "2026-12-29 12:00",    # 2026-W53
                   "2027-01-01 12:00",    # 2026-W53
                   "2027-01-03 12:00",    # 2026-W53 (newest of its week)
                   "2027-01-05 12:00")    # 2027-W01
    assert kept(plan(sets, Policy(keep_weekly=3))) == {
        "s2027-01-05 12:00": ("weekly 2027-W01",),
        "s2027-01-03 12:00": ("weekly 2026-W53",),
        "s2026-12-24 12:00": ("weekly 2026-W52",),
    }
    # by calendar year instead, 2027-01-03 is the newest of 2027 and 2026-12-29 of 2026
    assert kept(plan(sets, Policy(keep_yearly=5))) == {
        "s2027-01-05 12:00": ("yearly 2027",),
        "s2026-12-29 12:00": ("yearly 2026",),
        "s2026-12-24 12:00": ("oldest yearly 2026",),
    }


def test_keep_monthly_and_the_time_zone_of_buckets() -> None:
    sets = sets_at("2026-09-15 12:00", "2026-10-01 12:00", "2026-10-31 23:30",
                   "2026-11-01 00:30", "2026-11-20 12:00")
    assert kept(plan(sets, Policy(keep_monthly=2))) == {
        "s2026-11-20 12:00": ("monthly 2026-11",),
        "s2026-10-31 23:30": ("monthly 2026-10",),
    }
    # at UTC+1, 2026-10-31 23:30 UTC is already November: October's newest is 10-01
    plus_one = timezone(timedelta(hours=1))
    assert kept(plan(sets, Policy(keep_monthly=2), tz=plus_one)) == {
        "s2026-11-20 12:00": ("monthly 2026-11",),
        "s2026-10-01 12:00": ("monthly 2026-10",),
    }


def test_a_set_kept_by_several_rules_lists_every_reason() -> None:
    sets = sets_at("2026-10-15 12:00", "2026-11-29 12:00", "2026-11-30 08:00",
                   "2026-11-30 12:00", disks=frozenset({"h1/vm1/d0"}))
    policy = Policy(keep_last=1, keep_daily=2, keep_weekly=2, keep_monthly=2,
                    keep_yearly=1, keep_within=DAY)
    assert kept(plan(sets, policy)) == {
        "s2026-11-30 12:00": ("within 1d", "last 1", "daily 2026-11-30", "weekly 2026-W49",
                              "monthly 2026-11", "yearly 2026", "newest of h1/vm1/d0"),
        "s2026-11-30 08:00": ("within 1d",),
        "s2026-11-29 12:00": ("daily 2026-11-29", "weekly 2026-W48"),
        "s2026-10-15 12:00": ("monthly 2026-10",),
    }


def test_keep_within_counts_back_from_the_newest_set_not_from_now() -> None:
    # the newest set is years old: keep-within still keeps what is near it
    sets = sets_at("2020-01-05 12:00", "2020-01-08 12:00", "2020-01-08 12:00:01",
                   "2020-01-09 00:00", "2020-01-10 12:00")
    assert kept(plan(sets, Policy(keep_within=2 * DAY))) == {
        "s2020-01-10 12:00": ("within 2d",),
        "s2020-01-09 00:00": ("within 2d",),
        "s2020-01-08 12:00:01": ("within 2d",),
        # 2020-01-08 12:00 is exactly 2d before the newest: not strictly within (restic)
    }


def test_keep_within_ignores_sets_from_the_future_when_now_is_given() -> None:
    sets = sets_at("2026-11-20 12:00", "2026-11-29 12:00", "2027-06-01 00:00")
    now = at("2026-11-30 00:00")
    assert kept(plan(sets, Policy(keep_within=2 * DAY), now=now)) == {
        "s2027-06-01 00:00": ("within 2d",),     # later than the latest: kept
        "s2026-11-29 12:00": ("within 2d",),
    }
    assert list(kept(plan(sets, Policy(keep_within=2 * DAY)))) == ["s2027-06-01 00:00"]


def test_the_newest_set_of_a_disk_is_kept_even_if_old() -> None:
    # d1 was only backed up in the oldest set (e.g. a VM since removed)
    old = SetInfo("old", at("2025-01-01 00:00"), frozenset({"h1/vm1/d0", "h1/vm2/d1"}))
    mid = SetInfo("mid", at("2026-11-29 00:00"), frozenset({"h1/vm1/d0"}))
    new = SetInfo("new", at("2026-11-30 00:00"), frozenset({"h1/vm1/d0"}))
    assert plan([old, mid, new], Policy(keep_last=1)) == [
        Verdict("new", True, ("last 1", "newest of h1/vm1/d0")),
        Verdict("mid", False, ()),
        Verdict("old", True, ("newest of h1/vm2/d1",)),
    ]


def test_equal_times_are_ordered_by_set_id_and_input_order_does_not_matter() -> None:
    t = at("2026-11-30 00:00")
    sets = [SetInfo(i, t, NO_DISKS) for i in ("b", "c", "a")]
    assert plan(sets, Policy(keep_last=1)) == [
        Verdict("c", True, ("last 1",)), Verdict("b", False, ()), Verdict("a", False, ())]
    assert plan(reversed(sets), Policy(keep_last=1)) == plan(sets, Policy(keep_last=1))


def test_no_sets_no_verdicts() -> None:
    assert plan([], Policy(keep_last=1)) == []


def test_duplicate_set_ids_are_refused() -> None:
    sets = [SetInfo("x", 1.0, NO_DISKS), SetInfo("x", 2.0, NO_DISKS)]
    with pytest.raises(PolicyError, match="'x' appears twice"):
        plan(sets, Policy(keep_last=1))


# --- the configuration mapping -------------------------------------------------------


def test_from_mapping_and_describe() -> None:
    policy = Policy.from_mapping({"keep-last": 3, "keep-daily": 7, "keep-weekly": 4,
                                  "keep-within": "1d12h"})
    assert policy == Policy(keep_last=3, keep_daily=7, keep_weekly=4,
                            keep_within=DAY + 12 * HOUR)
    assert policy.describe() == "keep last 3, daily 7, weekly 4, within 1d12h"
    assert Policy.from_mapping({"keep-within": 5400}).keep_within == 5400.0
    assert Policy.from_mapping({"keep-within": 90.5}).describe() == "keep within 90.5s"
    assert Policy.from_mapping({"keep-yearly": 10, "keep-monthly": 0}).describe() \
        == "keep yearly 10"


@pytest.mark.parametrize("text,seconds", [
    ("2d", 2 * DAY), ("12h", 12 * HOUR), (" 1y2m3d4h ", (365 + 60 + 3) * DAY + 4 * HOUR),
    ("1y1d1m", (365 + 30 + 1) * DAY), ("0d", 0.0),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


# --- bad input: each refused with a one-line message -----------------------------------

BAD_POLICIES: list[tuple[dict[str, object], str]] = [
    ({"keep-last": -1}, "keep-last must not be negative"),
    ({"keep-daily": MAX_COUNT + 1}, f"keep-daily {MAX_COUNT + 1} is too large"),
    ({"keep-weekly": 1.5}, "keep-weekly must be a whole number, not 1.5"),
    ({"keep-monthly": "3"}, "keep-monthly must be a whole number, not '3'"),
    ({"keep-yearly": True}, "keep-yearly must be a whole number"),
    ({"keep-within": math.nan}, "keep-within must be a finite number"),
    ({"keep-within": math.inf}, "keep-within must be a finite number"),
    ({"keep-within": -1}, "keep-within must not be negative"),
    ({"keep-within": "101y"}, "keep-within 36865d is too large (at most 36500d, 100 years)"),
    ({"keep-within": 10**400}, "keep-within is too large"),
    ({"keep-within": None}, "keep-within must be a duration such as '2d'"),
    ({}, "retention policy keeps nothing: set at least one of keep-last"),
    ({"keep-last": 0, "keep-within": "0h"}, "keeps nothing"),
    ({"keep-dayly": 3}, "unknown retention key 'keep-dayly' (known: keep-last, "),
    ({"keep_daily": 3}, "unknown retention key 'keep_daily'"),
    ({"keep-within": "2w"}, "bad duration '2w'"),
    ({"keep-within": "30min"}, "bad duration '30min'"),
    ({"keep-within": "-1d"}, "bad duration '-1d'"),
    ({"keep-within": "3600"}, "bad duration '3600'"),
    ({"keep-within": ""}, "bad duration ''"),
    ({"keep-within": "1d1d"}, "bad duration '1d1d'"),
    ({"keep-within": "1.5d"}, "bad duration '1.5d'"),
]


@pytest.mark.parametrize("mapping,message", BAD_POLICIES)
def test_bad_policies_are_refused_clearly(mapping: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_mapping(mapping)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert isinstance(info.value, InvalidInput) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("kwargs,message", [
    ({"keep_last": -3}, "keep-last must not be negative"),
    ({"keep_hourly": MAX_COUNT + 1}, "too large"),
    ({"keep_within": math.nan}, "finite"),
    ({"keep_within": -math.inf}, "finite"),
    ({}, "keeps nothing"),
])
def test_constructor_checks_too(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        Policy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("cut_at", [math.nan, math.inf, -1.0, 1e12])
def test_bad_set_times_are_refused(cut_at: float) -> None:
    with pytest.raises(PolicyError, match="is not a unix time"):
        SetInfo("s", cut_at, NO_DISKS)


def test_bad_set_ids_and_disks_are_refused() -> None:
    with pytest.raises(PolicyError, match="set id must be a non-empty string"):
        SetInfo("", 1.0, NO_DISKS)
    with pytest.raises(PolicyError, match="disks must be a frozenset"):
        SetInfo("s", 1.0, {"d0"})  # type: ignore[arg-type]


# --- properties -------------------------------------------------------------------------

DISKS = ("h1/vm1/d0", "h1/vm1/d1", "h2/vm3/d0")
START = at("2025-12-01 00:00")


@st.composite
def set_lists(draw: st.DrawFn) -> list[SetInfo]:
    # times from minutes to months apart, so every bucket rule has work to do
    minute = st.one_of(st.integers(0, 3 * 24 * 60), st.integers(0, 400 * 24 * 60))
    offsets = draw(st.lists(minute, max_size=40, unique=True))
    return [SetInfo(f"set{i}", START + minutes * 60.0,
                    frozenset(draw(st.sets(st.sampled_from(DISKS)))))
            for i, minutes in enumerate(offsets)]


def any_policy() -> st.SearchStrategy[Policy]:
    counts = st.tuples(*(st.integers(0, 5) for _ in range(6)),
                       st.sampled_from([0.0, HOUR, DAY, 10 * DAY]))
    return counts.filter(lambda c: any(c)).map(lambda c: Policy(*c))


@settings(max_examples=200, deadline=None)
@given(set_lists(), any_policy())
def test_one_verdict_per_set_newest_first(sets: list[SetInfo], policy: Policy) -> None:
    verdicts = plan(sets, policy)
    times = {s.set_id: s.cut_at for s in sets}
    assert sorted(v.set_id for v in verdicts) == sorted(times)
    assert [times[v.set_id] for v in verdicts] == sorted(times.values(), reverse=True)
    assert all(v.keep == bool(v.reasons) for v in verdicts)
    assert plan(list(reversed(sets)), policy) == verdicts


@settings(max_examples=200, deadline=None)
@given(set_lists(), any_policy(), st.integers(1, 10))
def test_keep_last_n_always_keeps_the_n_newest(sets: list[SetInfo], policy: Policy,
                                               n: int) -> None:
    verdicts = plan(sets, replace(policy, keep_last=n))
    assert all(v.keep for v in verdicts[:n])


@settings(max_examples=200, deadline=None)
@given(set_lists(), any_policy())
def test_plan_never_removes_the_newest_set_of_a_disk(sets: list[SetInfo],
                                                     policy: Policy) -> None:
    keep = {v.set_id for v in plan(sets, policy) if v.keep}
    for disk in DISKS:
        holding = [s for s in sets if disk in s.disks]
        if holding:
            newest = max(holding, key=lambda s: (s.cut_at, s.set_id))
            assert newest.set_id in keep


@settings(max_examples=200, deadline=None)
@given(set_lists(), any_policy(), st.sampled_from(
    ["keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly",
     "keep_yearly"]))
def test_a_larger_count_never_removes_a_kept_set(sets: list[SetInfo], policy: Policy,
                                                 rule: str) -> None:
    more = replace(policy, **{rule: getattr(policy, rule) + 1})
    before = {v.set_id for v in plan(sets, policy) if v.keep}
    after = {v.set_id for v in plan(sets, more) if v.keep}
    assert before <= after


@settings(max_examples=200, deadline=None)
@given(set_lists(), any_policy())
def test_each_bucket_rule_keeps_at_most_its_count_of_distinct_buckets(
        sets: list[SetInfo], policy: Policy) -> None:
    verdicts = plan(sets, policy)
    for word in ("hourly", "daily", "weekly", "monthly", "yearly"):
        labels = [r for v in verdicts for r in v.reasons
                  if r.startswith((f"{word} ", f"oldest {word} "))]
        assert len(labels) <= getattr(policy, f"keep_{word}")
        plain = [r for r in labels if not r.startswith("oldest")]
        assert len(plain) == len(set(plain))
        # the oldest-rule only ever fires on the oldest set
        assert all(r in verdicts[-1].reasons for r in labels if r.startswith("oldest"))


@settings(max_examples=200, deadline=None)
@given(set_lists(), st.floats(1.0, 400 * DAY))
def test_keep_within_keeps_exactly_the_sets_near_the_newest(sets: list[SetInfo],
                                                            within: float) -> None:
    assume(sets)
    newest = max(s.cut_at for s in sets)
    verdicts = plan(sets, Policy(keep_within=within))
    by_id = {s.set_id: s for s in sets}
    for v in verdicts:
        near = by_id[v.set_id].cut_at > newest - within
        assert any(r.startswith("within ") for r in v.reasons) == near
