"""The one validator of what a backup asks for, shared by the client, the
coordinator and the agent: names, enums and the documented numeric ranges.

Ranges (also in the proto and ``blocktxn backup --help``):

- freeze timeout: 0..3600 s (0 = the default, 10 s)
- deadline: 0..604800 s from the start (0 = the default, 3600 s)
- speed: 0..2**63-1 bytes/s per disk (0 = unlimited)
- a wait (Prepare's timeout): 0 (no limit) or up to 604800 s
- a progress interval (Status): 0 (the default, 0.25 s) or 0.05..60 s
- targets per request, disks per cut: at most 4096; a reason: at most 1024 characters
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from blocktxn.errors import InvalidInput
from blocktxn.ids import check_id

MODES = ("auto", "full", "incremental")
QUIESCES = ("none", "freeze", "pause")
COMPLETIONS = ("grouped", "individual")

FREEZE_TIMEOUT_MAX = 3600.0
DEFAULT_FREEZE_TIMEOUT = 10.0
DEADLINE_MAX = 7 * 24 * 3600.0
DEFAULT_DEADLINE = 3600.0
SPEED_MAX = 2**63 - 1
WAIT_MAX = 7 * 24 * 3600.0
DEFAULT_INTERVAL = 0.25
INTERVAL_MIN, INTERVAL_MAX = 0.05, 60.0
MAX_TARGETS = 4096
MAX_REASON = 1024


def check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    """Raises: InvalidInput if *value* is not one of *choices*."""
    if value not in choices:
        raise InvalidInput(f"{what} {value!r} is not one of {', '.join(choices)}")
    return value


def check_range(value: float, low: float, high: float, what: str, unit: str = "") -> float:
    """Raises: InvalidInput if *value* is not a number within low..high."""
    if math.isnan(value) or not low <= value <= high:
        raise InvalidInput(f"{what} {value:g}{unit} is not within {low:g}..{high:g}{unit}")
    return value


def check_speed(speed: int) -> int:
    """Raises: InvalidInput for a negative or too large speed."""
    if speed < 0:
        raise InvalidInput(f"speed {speed} is negative")
    if speed > SPEED_MAX:
        raise InvalidInput(f"speed {speed} is above {SPEED_MAX}")
    return speed


def check_wait(seconds: float, what: str) -> float | None:
    """A wait in seconds: None for 0 (no limit). Raises: InvalidInput outside 0..7 days."""
    check_range(seconds, 0.0, WAIT_MAX, what, "s")
    return seconds or None


def check_interval(seconds: float) -> float:
    """A progress interval: the default for 0. Raises: InvalidInput outside 0.05..60 s."""
    if seconds == 0:
        return DEFAULT_INTERVAL
    return check_range(seconds, INTERVAL_MIN, INTERVAL_MAX, "interval", "s")


def cut_text(text: str, bound: int) -> str:
    """*text* if its JSON form (non-ASCII and quotes escaped, as records are stored)
    takes at most *bound* bytes, else its longest prefix that does with "..." added."""
    if len(json.dumps(text)) - 2 <= bound:
        return text
    out, used = [], 3
    for ch in text:
        n = len(json.dumps(ch)) - 2
        if used + n > bound:
            break
        out.append(ch)
        used += n
    return "".join(out) + "..."


def check_reason(text: str) -> str:
    """Raises: InvalidInput for a reason longer than 1024 characters."""
    if len(text) > MAX_REASON:
        raise InvalidInput(f"reason of {len(text)} characters is longer than {MAX_REASON}")
    return text


def check_freeze_timeout(seconds: float) -> float:
    """Raises: InvalidInput outside 0..3600 s."""
    return check_range(seconds, 0.0, FREEZE_TIMEOUT_MAX, "freeze timeout", "s")


@dataclass(frozen=True)
class Target:
    """``AGENT/VM`` (every disk of the VM) or ``AGENT/VM/DISK``."""

    agent_id: str
    vm: str
    disk: str = ""  # "" = every disk

    @classmethod
    def parse(cls, text: str) -> Target:
        """Raises: InvalidInput for anything but AGENT/VM or AGENT/VM/DISK of safe names."""
        parts = text.split("/")
        if len(parts) not in (2, 3):
            raise InvalidInput(f"target {text!r} is not AGENT/VM or AGENT/VM/DISK")
        for value, what in zip(parts, ("agent id", "VM name", "disk name"), strict=False):
            check_id(value, what)
        return cls(*parts)

    def __str__(self) -> str:
        return "/".join(p for p in (self.agent_id, self.vm, self.disk) if p)


@dataclass(frozen=True)
class BackupOptions:
    """How to back up: the same for every target unless a target names its mode."""

    mode: str = "auto"
    completion: str = "grouped"
    quiesce: str = "none"
    freeze_timeout: float = 0.0
    deadline: float = 0.0
    speed: int = 0
    request_id: str = ""
    group: str = ""  # retention group of the set it makes

    def check(self) -> None:
        """Raises: InvalidInput on an unknown name or a value outside its range."""
        check_choice(self.mode, MODES, "mode")
        check_choice(self.quiesce, QUIESCES, "quiesce")
        check_choice(self.completion, COMPLETIONS, "completion")
        check_freeze_timeout(self.freeze_timeout)
        if self.deadline < 0:
            raise InvalidInput(f"deadline {self.deadline:g}s is in the past")
        check_range(self.deadline, 0.0, DEADLINE_MAX, "deadline", "s")
        check_speed(self.speed)
        if self.request_id:
            check_id(self.request_id, "request id")
        if self.group:
            check_id(self.group, "retention group")


@dataclass(frozen=True)
class BackupRequest:
    """A whole backup request: targets (each with an optional mode of its own) and options."""

    targets: tuple[tuple[str, str], ...]  # (AGENT/VM[/DISK], mode or "" for the default)
    options: BackupOptions = BackupOptions()

    def check(self) -> list[tuple[Target, str]]:
        """The parsed targets with their modes.

        Raises:
            InvalidInput: no target, a malformed one, or a bad option.
        """
        self.options.check()
        if not self.targets:
            raise InvalidInput("no targets: name at least one AGENT/VM[/DISK]")
        if len(self.targets) > MAX_TARGETS:
            raise InvalidInput(f"{len(self.targets)} targets: at most {MAX_TARGETS}")
        out = []
        for text, mode in self.targets:
            target = Target.parse(text)
            mode = mode or self.options.mode
            check_choice(mode, MODES, f"mode of {text}")
            out.append((target, mode))
        return out


@dataclass(frozen=True)
class DiskRequest:
    """One disk of a cut, as the coordinator asks an agent for it."""

    vm: str
    disk: str
    mode: str = "auto"
    speed: int = 0

    def check(self) -> None:
        """Raises: InvalidInput."""
        check_id(self.vm, "VM name")
        check_id(self.disk, "disk name")
        check_choice(self.mode, MODES, "mode")
        check_speed(self.speed)


def check_cut(txn_id: str, disks: list[DiskRequest], quiesce: str,
              freeze_timeout: float) -> None:
    """Validate an agent's Cut request.

    Raises:
        InvalidInput: a bad name, value, or a disk named twice.
    """
    check_id(txn_id, "transaction id")
    if not disks:
        raise InvalidInput("no members: a cut needs at least one VM/disk")
    if len(disks) > MAX_TARGETS:
        raise InvalidInput(f"{len(disks)} members: at most {MAX_TARGETS}")
    check_choice(quiesce, QUIESCES, "quiesce")
    check_freeze_timeout(freeze_timeout)
    seen: set[tuple[str, str]] = set()
    for d in disks:
        d.check()
        if (d.vm, d.disk) in seen:
            raise InvalidInput(f"disk {d.vm}/{d.disk} is named twice")
        seen.add((d.vm, d.disk))
