"""Agent configuration: parsed once from the command line, passed down explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from blocktxn.ids import check_id
from blocktxn.tls import TlsFiles


@dataclass(frozen=True)
class VmConfig:
    name: str
    qmp: str
    ga: str | None = None


@dataclass(frozen=True)
class AgentConfig:
    agent_id: str
    listen: str
    repo: Path
    vms: tuple[VmConfig, ...]
    restore_dirs: tuple[Path, ...] = field(default=())
    coordinator: str | None = None
    advertise: str | None = None  # address the coordinator should dial
    qmp_timeout: float = 10.0
    connect_wait: float = 5.0  # at start, wait this long for every VM's QMP
    tls: TlsFiles = field(default_factory=TlsFiles)
    in_doubt_after: float = 30.0  # a vote this old with no decision: ask for it


def parse_vm(spec: str) -> VmConfig:
    """Parse ``NAME=QMP_SOCKET[,ga=GUEST_AGENT_SOCKET]``.

    Raises:
        ValueError: malformed spec or unsafe name.
    """
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise ValueError(f"--vm {spec!r}: expected NAME=QMP_SOCKET[,ga=GUEST_AGENT_SOCKET]")
    check_id(name, "VM name")
    parts = rest.split(",")
    ga = None
    for extra in parts[1:]:
        key, _, value = extra.partition("=")
        if key != "ga" or not value:
            raise ValueError(f"--vm {spec!r}: unknown option {extra!r} (only ga=PATH)")
        ga = value
    return VmConfig(name, parts[0], ga)
