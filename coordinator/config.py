"""Coordinator configuration: parsed once from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
