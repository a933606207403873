"""Retention policies: which backup sets to keep, with the semantics of restic's
``forget`` (``--keep-last``, ``--keep-hourly`` ... ``--keep-yearly``, ``--keep-within``)
plus one rule of ours: a set is kept while it is the newest set holding one of its
disks, so every disk ever backed up keeps at least one restorable image.

Pure: no I/O, no clock, no asyncio. :func:`plan` only says which sets to keep and
why; removing the others (rebasing the images that depend on them) is up to its
caller.

How :func:`plan` decides, following restic (``internal/restic/snapshot_policy.go``,
``ApplyPolicy``, as of restic 0.17/0.18):

* The sets are sorted newest first (ties: the larger ``set_id`` first).
* ``keep_last`` keeps the N newest sets.
* Each bucket rule (hourly, daily, weekly, monthly, yearly) walks the sets newest to
  oldest and keeps a set whose bucket differs from the bucket of the set the rule
  kept last, while the rule's count is not used up; so each kept set is the newest of
  its hour / day / ISO week / month / year. (restic compares with the bucket of the
  last set the rule *kept*; as buckets only go down on a newest-to-oldest walk, that
  is also the bucket of the previous set seen while the rule has counts left.)
* If a rule still has counts left when it reaches the oldest set, it keeps the oldest
  set too even if it shares the bucket of a newer kept set (restic >= 0.17: "keeps
  the longest history while counts are left"); that reason reads ``oldest daily ...``.
* ``keep_within`` keeps every set strictly newer than ``latest - keep_within``, where
  ``latest`` is the time of the NEWEST set, not the current time (restic measures from
  the latest snapshot, so a host that stopped backing up does not lose everything).
  With ``now`` given, sets later than ``now`` do not count as the latest (restic
  ignores snapshots from the future there too).
* Ours: a set is kept while it is the newest set holding some disk
  (reason ``newest of DISK``).

A set is kept if any rule keeps it; every rule that keeps it is listed as a reason.

Differences from restic, all deliberate: counts cannot be "unlimited" (-1; use a
large count); durations are plain seconds, so the ``y`` and ``m`` units of a duration
string are fixed lengths (365 and 30 days) instead of calendar years and months; a
policy that keeps nothing is refused (restic's ``forget`` refuses it too); sets with
the same time are ordered by ``set_id`` (restic keeps their input order).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime, tzinfo

from blocktxn.errors import InvalidInput

#: The largest count a ``keep_*`` rule may have.
MAX_COUNT = 100_000
HOUR = 3600.0
DAY = 24 * HOUR
#: What the ``y`` and ``m`` units of a duration string stand for.
YEAR = 365 * DAY
MONTH = 30 * DAY
#: The longest ``keep_within`` (100 years of 365 days).
MAX_WITHIN = 100 * YEAR
#: Set times must lie in [0, MAX_TIME) (the year 3000), so any time zone can show them.
MAX_TIME = 32_503_680_000.0

_COUNT_FIELDS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly",
                 "keep_monthly", "keep_yearly")
_DURATION = re.compile(r"(?:\d{1,9}[ymdh])+")
_DURATION_PART = re.compile(r"(\d{1,9})([ymdh])")
_UNIT = {"y": YEAR, "m": MONTH, "d": DAY, "h": HOUR}


class PolicyError(InvalidInput, ValueError):
    """A retention policy or its input is invalid (an InvalidInput for the services,
    a ValueError for configuration parsing)."""


def _key(name: str) -> str:
    """The configuration key of a Policy field: ``keep_last`` -> ``keep-last``."""
    return name.replace("_", "-")


def parse_duration(text: str) -> float:
    """Seconds in a restic-style duration: ``"2d"``, ``"12h"``, ``"1y2m3d4h"``.

    Units, each at most once: ``y`` (365 days), ``m`` (months of 30 days, not
    minutes), ``d`` (days), ``h`` (hours).

    Raises:
        PolicyError: not such a duration.
    """
    stripped = text.strip()
    parts = _DURATION_PART.findall(stripped)
    units = [unit for _, unit in parts]
    if not _DURATION.fullmatch(stripped) or len(set(units)) != len(units):
        raise PolicyError(
            f"bad duration {text!r}: expected e.g. '2d', '12h' or '1y2m3d4h' "
            "(units y=365 days, m=30 days, d=days, h=hours, each at most once)")
    return sum(int(number) * _UNIT[unit] for number, unit in parts)


def format_duration(seconds: float) -> str:
    """A short form of *seconds*: ``"2d"``, ``"1d12h"``, ``"90s"``."""
    if seconds > 0 and seconds == int(seconds) and int(seconds) % int(HOUR) == 0:
        days, hours = divmod(int(seconds) // int(HOUR), 24)
        return (f"{days}d" if days else "") + (f"{hours}h" if hours else "")
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Policy:
    """What to keep; checked when made (raises :class:`PolicyError`).

    Counts are whole numbers in [0, MAX_COUNT]; ``keep_within`` is seconds, finite, in
    [0, MAX_WITHIN]. At least one rule must be set: a policy that keeps nothing would
    leave only the newest set of each disk and is refused as a likely mistake.
    """

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    keep_within: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`PolicyError` unless every value is in range and some rule
        keeps something."""
        for name in _COUNT_FIELDS:
            value: object = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise PolicyError(f"{_key(name)} must be a whole number, not {value!r}")
            if value < 0:
                raise PolicyError(f"{_key(name)} must not be negative (got {value})")
            if value > MAX_COUNT:
                raise PolicyError(f"{_key(name)} {value} is too large (at most {MAX_COUNT})")
        within: object = self.keep_within
        if not isinstance(within, int | float) or isinstance(within, bool):
            raise PolicyError(f"keep-within must be a number of seconds, not {within!r}")
        if not math.isfinite(within):
            raise PolicyError(f"keep-within must be a finite number of seconds (got {within})")
        if within < 0:
            raise PolicyError(f"keep-within must not be negative (got {within})")
        if within > MAX_WITHIN:
            raise PolicyError(f"keep-within {format_duration(within)} is too large "
                              f"(at most {format_duration(MAX_WITHIN)}, 100 years)")
        if within == 0 and not any(getattr(self, name) for name in _COUNT_FIELDS):
            raise PolicyError(
                "retention policy keeps nothing: set at least one of "
                + ", ".join(_key(f.name) for f in fields(self)))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object]) -> Policy:
        """The policy in a configuration mapping, e.g. parsed TOML::

            {"keep-daily": 7, "keep-weekly": 4, "keep-within": "2d"}

        Keys are ``keep-last``, ``keep-hourly``, ``keep-daily``, ``keep-weekly``,
        ``keep-monthly``, ``keep-yearly`` (whole numbers) and ``keep-within`` (a
        duration string, see :func:`parse_duration`, or a number of seconds).

        Raises:
            PolicyError: an unknown key, a value of the wrong type or out of range, or
                nothing to keep.
        """
        known = {_key(f.name): f.name for f in fields(cls)}
        counts: dict[str, int] = {}
        within = 0.0
        for key, value in mapping.items():
            name = known.get(key) if isinstance(key, str) else None
            if name is None:
                raise PolicyError(f"unknown retention key {key!r} "
                                  f"(known: {', '.join(known)})")
            if name != "keep_within":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise PolicyError(f"{key} must be a whole number, not {value!r}")
                counts[name] = value
            elif isinstance(value, str):
                within = parse_duration(value)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                try:
                    within = float(value)
                except OverflowError:
                    raise PolicyError(
                        f"keep-within is too large (at most {format_duration(MAX_WITHIN)})"
                    ) from None
            else:
                raise PolicyError(f"keep-within must be a duration such as '2d' "
                                  f"or a number of seconds, not {value!r}")
        return cls(**counts, keep_within=within)

    def describe(self) -> str:
        """A short summary, e.g. ``"keep last 3, daily 7, within 2d"``."""
        parts = [f"{name.removeprefix('keep_')} {getattr(self, name)}"
                 for name in _COUNT_FIELDS if getattr(self, name)]
        if self.keep_within:
            parts.append(f"within {format_duration(self.keep_within)}")
        return "keep " + ", ".join(parts)


@dataclass(frozen=True)
class SetInfo:
    """What :func:`plan` needs of a backup set: its id, its cut time (unix seconds)
    and the disks it holds an image of (opaque keys such as ``"h1/vm1/d0"``)."""

    set_id: str
    cut_at: float
    disks: frozenset[str]

    def __post_init__(self) -> None:
        if not isinstance(self.set_id, str) or not self.set_id:
            raise PolicyError(f"set id must be a non-empty string, not {self.set_id!r}")
        cut_at: object = self.cut_at
        if not isinstance(cut_at, int | float) or isinstance(cut_at, bool) \
                or not math.isfinite(cut_at) or not 0 <= cut_at < MAX_TIME:
            raise PolicyError(f"set {self.set_id}: cut time {cut_at!r} is not a unix "
                              f"time in [0, {MAX_TIME:.0f})")
        disks: object = self.disks
        if not isinstance(disks, frozenset) \
                or not all(isinstance(d, str) and d for d in disks):
            raise PolicyError(f"set {self.set_id}: disks must be a frozenset of "
                              f"non-empty strings, not {disks!r}")


@dataclass(frozen=True)
class Verdict:
    """Whether to keep one set, and every rule that keeps it (empty if removed)."""

    set_id: str
    keep: bool
    reasons: tuple[str, ...]


def _hour(t: datetime) -> str:
    return f"{t:%Y-%m-%dT%H}"


def _day(t: datetime) -> str:
    return f"{t:%Y-%m-%d}"


def _week(t: datetime) -> str:
    year, week, _ = t.isocalendar()
    return f"{year:04d}-W{week:02d}"


def _month(t: datetime) -> str:
    return f"{t:%Y-%m}"


def _year(t: datetime) -> str:
    return f"{t:%Y}"


#: The bucket rules in restic's order: field, reason word, bucket of a local time.
#: Each bucket label sorts and compares like restic's YYYYMMDDHH-style integers.
_BUCKETS: tuple[tuple[str, str, Callable[[datetime], str]], ...] = (
    ("keep_hourly", "hourly", _hour),
    ("keep_daily", "daily", _day),
    ("keep_weekly", "weekly", _week),
    ("keep_monthly", "monthly", _month),
    ("keep_yearly", "yearly", _year),
)


def plan(sets: Iterable[SetInfo], policy: Policy, *, tz: tzinfo = UTC,
         now: float | None = None) -> list[Verdict]:
    """Which of *sets* to keep under *policy*: one verdict per set, newest first.

    Hours, days, ISO weeks, months and years are those of time zone *tz* (default
    UTC: pass e.g. ``zoneinfo.ZoneInfo("Europe/Berlin")`` for local days). ``now``
    (unix seconds), if given, only stops sets from the future from counting as the
    latest for ``keep_within``; without it the newest set is the latest. See the
    module docstring for the rules.

    Raises:
        PolicyError: two sets have the same id.
    """
    policy.validate()
    ordered = sorted(sets, key=lambda s: (s.cut_at, s.set_id), reverse=True)
    seen: set[str] = set()
    for s in ordered:
        if s.set_id in seen:
            raise PolicyError(f"set id {s.set_id!r} appears twice")
        seen.add(s.set_id)
    if not ordered:
        return []

    reasons: list[list[str]] = [[] for _ in ordered]

    if policy.keep_within:
        candidates = [s.cut_at for s in ordered if now is None or s.cut_at < now]
        # restic: with every set in the future, "latest" is the zero time: keep all.
        latest = candidates[0] if candidates else -math.inf
        cutoff = latest - policy.keep_within
        label = f"within {format_duration(policy.keep_within)}"
        for i, s in enumerate(ordered):
            if s.cut_at > cutoff:
                reasons[i].append(label)

    for i in range(min(policy.keep_last, len(ordered))):
        reasons[i].append(f"last {i + 1}")

    oldest = len(ordered) - 1
    local = [datetime.fromtimestamp(s.cut_at, tz) for s in ordered]
    for name, word, bucket in _BUCKETS:
        left: int = getattr(policy, name)
        last: str | None = None
        for i, t in enumerate(local):
            if left == 0:
                break
            value = bucket(t)
            if value != last:
                reasons[i].append(f"{word} {value}")
            elif i == oldest:
                reasons[i].append(f"oldest {word} {value}")
            else:
                continue
            last = value
            left -= 1

    newest_of: set[str] = set()
    for i, s in enumerate(ordered):
        for disk in sorted(s.disks - newest_of):
            reasons[i].append(f"newest of {disk}")
        newest_of |= s.disks

    return [Verdict(s.set_id, bool(r), tuple(r)) for s, r in zip(ordered, reasons, strict=True)]
