"""Agent configuration: parsed once from the command line, passed down explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from blocktxn.access import RoleMap
from blocktxn.ids import check_id
from blocktxn.tls import TlsFiles

#: Default of --staged-alone-after (seconds; why this long: agent/indoubt.py).
STAGED_ALONE_AFTER = 900.0

@dataclass(frozen=True)
class VmConfig:
    name: str
    qmp: str  # "" for a libvirt domain
    ga: str | None = None
    watch: str | None = None  # a second QMP monitor, for the freeze watchdog (pause)
    libvirt_domain: str | None = None  # the VM is this libvirt domain (libvirt backend)


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
    staged_alone_after: float = STAGED_ALONE_AFTER  # staged, never cut, none answers
    max_chain: int = 32  # images a restore may open: a longer chain takes a full (auto)
    metrics_listen: str | None = None  # HOST:PORT of the Prometheus endpoint (None: off)
    roles: RoleMap = field(default_factory=RoleMap)  # who may call (role coordinator)
    libvirt_uri: str = "qemu:///system"  # where the libvirt domains of --vm are


LIBVIRT = "libvirt:"


def parse_vm(spec: str) -> VmConfig:
    """Parse ``NAME=QMP_SOCKET[,ga=GUEST_AGENT_SOCKET][,watch=QMP_SOCKET]`` (bare QEMU:
    ``ga`` enables quiesce freeze; ``watch``, a second QMP monitor of the same VM that
    only the freeze watchdog uses, enables quiesce pause) or ``NAME=libvirt:DOMAIN``
    (a libvirt domain: libvirt gives its disks, guest agent and suspend/resume).

    Raises:
        ValueError: malformed spec or unsafe name.
    """
    usage = "NAME=QMP_SOCKET[,ga=GUEST_AGENT_SOCKET][,watch=QMP_SOCKET] or NAME=libvirt:DOMAIN"
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise ValueError(f"--vm {spec!r}: expected {usage}")
    check_id(name, "VM name")
    if rest.startswith(LIBVIRT):
        domain = rest[len(LIBVIRT):]
        if not domain or "," in domain or "/" in domain:
            raise ValueError(f"--vm {spec!r}: expected NAME=libvirt:DOMAIN (a libvirt "
                             f"domain name; no options: libvirt knows its guest agent)")
        return VmConfig(name, "", libvirt_domain=domain)
    parts = rest.split(",")
    options: dict[str, str] = {}
    for extra in parts[1:]:
        key, _, value = extra.partition("=")
        if key not in ("ga", "watch") or not value or key in options:
            raise ValueError(f"--vm {spec!r}: bad option {extra!r} (expected {usage})")
        options[key] = value
    return VmConfig(name, parts[0], options.get("ga"), options.get("watch"))
