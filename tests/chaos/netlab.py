"""Lab hosts as network namespaces joined by a bridge (DESIGN.md's safety rules).

- The lab subnet is blackholed in the root namespace FIRST, so nothing addressed
  to a lab host can leave the machine from the root namespace.
- Lab addresses are only used from inside lab namespaces (every lab process,
  and the chaos driver itself, run in one).
- ``teardown`` kills what runs in the lab namespaces, deletes them and the
  route; it is idempotent and runs on success, failure and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

PREFIX = "btxlab-"
SUBNET = "10.213.77"
BRIDGE_NS = PREFIX + "br"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


@dataclass
class NetLab:
    """Named hosts, each a namespace with one address on the lab bridge."""

    hosts: dict[str, int] = field(default_factory=dict)  # name -> last address octet

    def ns(self, host: str) -> str:
        return PREFIX + host

    def addr(self, host: str) -> str:
        return f"{SUBNET}.{self.hosts[host]}"

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)]

    def setup(self, names: list[str]) -> None:
        """Raises: subprocess.CalledProcessError (then call teardown)."""
        # 1. blackhole first: the root namespace can never reach the lab subnet
        _ip("route", "replace", "blackhole", f"{SUBNET}.0/24")
        _ip("netns", "add", BRIDGE_NS)
        _ip("-n", BRIDGE_NS, "link", "add", "br0", "type", "bridge")
        _ip("-n", BRIDGE_NS, "link", "set", "br0", "up")
        _ip("-n", BRIDGE_NS, "link", "set", "lo", "up")
        for i, name in enumerate(names):
            octet = 10 + i
            self.hosts[name] = octet
            ns = self.ns(name)
            _ip("netns", "add", ns)
            # veth created inside the bridge namespace, one end moved to the host
            _ip("-n", BRIDGE_NS, "link", "add", f"b-{name}", "type", "veth", "peer", "name",
                "eth0", "netns", ns)
            _ip("-n", BRIDGE_NS, "link", "set", f"b-{name}", "master", "br0")
            _ip("-n", BRIDGE_NS, "link", "set", f"b-{name}", "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{octet}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def cut(self, host: str) -> None:
        """Cut *host* off the network (its bridge port goes down)."""
        _ip("-n", BRIDGE_NS, "link", "set", f"b-{host}", "down")

    def heal(self, host: str) -> None:
        _ip("-n", BRIDGE_NS, "link", "set", f"b-{host}", "up")


def lab_namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def teardown() -> None:
    """Kill every process in a lab namespace, delete the namespaces and the route."""
    for ns in lab_namespaces():
        pids = _ip("netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGCONT)
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _ip("netns", "pids", ns, check=False).stdout.split() and time.monotonic() < deadline:
            time.sleep(0.05)
        _ip("netns", "delete", ns, check=False)
    _ip("route", "del", "blackhole", f"{SUBNET}.0/24", check=False)
