"""Coordinator configuration: parsed once from the command line."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from blocktxn.ids import check_id
from blocktxn.retention import Policy
from blocktxn.tls import TlsFiles


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
