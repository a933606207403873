"""Fixtures for tests on a real Linux guest: built from Debian packages, booted in QEMU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktxn.demo.realguest.image import GuestImage, build_guest_image, make_data_disk
from blocktxn.demo.realguest.qga import GuestAgent
from blocktxn.demo.realguest.vm import GuestVm


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The guest kernel and initramfs (downloaded and built once, then cached)."""
    return build_guest_image()


@pytest.fixture
def guest_vm(guest_image: GuestImage, tmp_path: Path) -> Iterator[GuestVm]:
    """A booted guest with an empty ext4 data disk; QEMU is stopped after the test."""
    disk = tmp_path / "data.img"
    make_data_disk(disk)
    vm = GuestVm(guest_image, tmp_path / "vm", disk)
    try:
        vm.start()
        yield vm
    finally:
        vm.close()


@pytest.fixture
def guest_agent(guest_vm: GuestVm) -> Iterator[GuestAgent]:
    """A synchronised connection to the guest's qemu-guest-agent."""
    ga = GuestAgent(guest_vm.agent_socket)
    try:
        ga.sync()
        yield ga
    finally:
        ga.close()
