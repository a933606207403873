"""The libvirt fixtures leave no QEMU behind: libvirtd keeps its domains' QEMUs running
when it stops or dies, so a teardown whose libvirt calls fail ends the QEMU of each
domain it created by PID (libvirtd's pid file), and only a qemu-system process of that
very domain."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import libvirt
import pytest

from blocktxn import procs
from tests.integration.libvirt_lab import (
    OWNED,
    QEMU_PID_DIR,
    URI,
    LibvirtHost,
    OwnedDomains,
    domain_qemu,
)

pytestmark = pytest.mark.integration


def _qemu(guest: str) -> subprocess.Popen[bytes]:
    """A qemu-system process named like a libvirt domain's QEMU (no guest, no disks)."""
    return subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
         "-name", f"guest={guest},debug-threads=on"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    mine: list[subprocess.Popen[bytes]] = []
    yield mine
    for p in mine:
        procs.kill(p)


def test_only_the_qemu_of_a_domain_it_created_is_ended(
        tmp_path: Path, started: list[subprocess.Popen[bytes]]) -> None:
    owned_qemu = _qemu("btxtest-a")
    not_qemu = subprocess.Popen(["sleep", "300"])
    other_domain = _qemu("btxtest-other")
    not_owned = _qemu("btxtest-d")
    started += [owned_qemu, not_qemu, other_domain, not_owned]
    for domain, proc in (("btxtest-a", owned_qemu), ("btxtest-b", not_qemu),
                         ("btxtest-c", other_domain), ("btxtest-d", not_owned)):
        (tmp_path / f"{domain}.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 20
    while not all(domain_qemu(p.pid, d) for p, d in ((owned_qemu, "btxtest-a"),
                                                     (not_owned, "btxtest-d"))):
        assert time.monotonic() < deadline, "the QEMUs did not start"
        time.sleep(0.05)
    assert not domain_qemu(not_qemu.pid, "btxtest-b")          # not a qemu-system
    assert not domain_qemu(other_domain.pid, "btxtest-c")      # another domain's QEMU

    owned = OwnedDomains(tmp_path)
    for d in ("btxtest-a", "btxtest-b", "btxtest-c", "btxtest-e"):  # e: no pid file
        owned.add(d)
    assert owned.reap_all() == {"btxtest-a": [owned_qemu.pid]}
    assert owned_qemu.wait(10) is not None
    assert [p.poll() for p in (not_qemu, other_domain, not_owned)] == [None, None, None]
    assert owned.reap_all() == {}                               # nothing left to end


class _DeadLibvirt:
    """A libvirt connection whose every call fails, as they do once libvirtd is gone."""

    def __getattr__(self, name: str) -> Callable[..., NoReturn]:
        def fail(*args: Any, **kw: Any) -> NoReturn:
            raise libvirt.libvirtError(f"{name}: libvirtd is gone")
        return fail


def test_a_teardown_whose_libvirt_calls_fail_leaves_no_qemu_running(
        make_libvirt_host: Callable[..., LibvirtHost]) -> None:
    host = make_libvirt_host(start=False)
    vm = host.domain("vm1")
    pid = int((QEMU_PID_DIR / f"{vm.domain}.pid").read_text())
    assert domain_qemu(pid, vm.domain)
    assert pid in OWNED.pids[vm.domain]                         # seen when it started
    live = vm._conn
    vm._conn = _DeadLibvirt()
    try:
        host.close()                                            # what the fixture does
        assert not domain_qemu(pid, vm.domain), "the domain's QEMU still runs"
    finally:
        live.close()
        conn = libvirt.open(URI)                                # the real libvirtd: tidy up
        try:
            dom = conn.lookupByName(vm.domain)
            deadline = time.monotonic() + 20
            while dom.isActive():
                assert time.monotonic() < deadline, "libvirt did not see its QEMU end"
                time.sleep(0.05)
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        finally:
            conn.close()
