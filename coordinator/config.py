"""Coordinator configuration: parsed once from the command line."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from blocktxn.access import RoleMap
from blocktxn.ids import check_id
from blocktxn.retention import Policy
from blocktxn.tls import TlsFiles

from .errors import ConfigError
from .etcd_client import EtcdAccess

if TYPE_CHECKING:
    from .schedule import Schedule

_UNITS = {"": 1, "s": 1, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([a-z]*)")


@dataclass(frozen=True)
class CoordinatorConfig:
    name: str
    listen: str
    advertise: str            # address other replicas and clients dial
    etcd: str | None          # None: run a private single-member etcd
    data_dir: Path
    etcd_timeout: float = 5.0
    tls: TlsFiles = field(default_factory=TlsFiles)
    keep_finished: float = 7 * 86400.0  # s a finished txn record stays in etcd (upkeep.py)
    retention: Mapping[str, Policy] = field(default_factory=dict)  # group -> policy
    metrics_listen: str | None = None  # HOST:PORT of the Prometheus endpoint (None: off)
    heartbeat_listen: str | None = None  # HOST:PORT of the heartbeat server (None: any port)
    schedules: tuple[Schedule, ...] = ()
    etcd_access: EtcdAccess = field(default_factory=EtcdAccess)
    roles: RoleMap = field(default_factory=RoleMap)  # empty: every TLS client may do all
    keep_audit: float = 90 * 86400.0  # s an audit record stays in etcd


def parse_retention(spec: str) -> tuple[str, Policy]:
    """``GROUP=KEY=VALUE[,KEY=VALUE...]``, e.g.
    ``web=keep-last=5,keep-daily=7,keep-within=2d`` (keys as in restic's forget).

    Raises:
        ValueError: a bad group name, key or value, or a policy that keeps nothing.
    """
    group, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise ValueError(f"--retention {spec!r}: expected GROUP=KEY=VALUE[,KEY=VALUE...]")
    check_id(group, "retention group")
    items: dict[str, object] = {}
    for part in rest.split(","):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"--retention {spec!r}: {part!r} is not KEY=VALUE")
        try:
            items[key.strip()] = int(value)
        except ValueError:
            items[key.strip()] = value.strip()
    try:
        return group, Policy.from_mapping(items)
    except ValueError as err:
        raise ValueError(f"--retention {spec!r}: {err}") from err


def parse_seconds(text: str, option: str, low: float, high: float) -> float:
    """Seconds, or a number with a unit s, h, d or w, within *low*..*high*.

    Raises:
        ConfigError: naming *option*.
    """
    found = _DURATION.fullmatch(str(text).strip().lower())
    if found is None or found.group(2) not in _UNITS:
        raise ConfigError(f"{option} {text!r} is not seconds or a duration like "
                          "12h, 7d (units s, h, d, w)")
    seconds = float(found.group(1)) * _UNITS[found.group(2)]
    if not low <= seconds <= high:
        raise ConfigError(f"{option} {text!r} is out of range {_span(low)}..{_span(high)}")
    return seconds


def _span(seconds: float) -> str:
    for unit in ("d", "h"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"
