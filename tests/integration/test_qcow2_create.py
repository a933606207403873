"""The agent's in-process qcow2 writer against ``qemu-img create`` of QEMU 7.2: the
same bytes for every size and backing name, and an image QEMU opens and checks clean."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktxn.agent import qcow2

pytestmark = pytest.mark.integration

EDGES = [512, 4 << 20, (4 << 20) + 512, 512 << 20, (512 << 20) + 512, 1 << 30, 4 << 40,
         (4 << 40) + 512, 64 << 40, 1 << 50]


def qemu_img_create(path: Path, size: int, backing: str) -> bytes:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        argv += ["-u", "-b", backing, "-F", "qcow2"]
    subprocess.run([*argv, str(path), str(size)], check=True, timeout=60)
    return path.read_bytes()


def same_as_qemu_img(tmp: Path, size: int, backing: str) -> None:
    ours, theirs = tmp / "ours.qcow2", tmp / "theirs.qcow2"
    for p in (ours, theirs):
        p.unlink(missing_ok=True)
    qcow2.create(ours, size, backing)
    assert ours.read_bytes() == qemu_img_create(theirs, size, backing)


@pytest.mark.parametrize("size", EDGES)
@pytest.mark.parametrize("backing", ["", "tx-20261203-104922-af72d4.qcow2", "b" * 255])
def test_edges_byte_identical(tmp_path: Path, size: int, backing: str) -> None:
    same_as_qemu_img(tmp_path, size, backing)


@settings(max_examples=40, deadline=None)
@given(sectors=st.integers(1, 1 << 40),
       backing=st.text("abcdefghijklmnopqrstuvwxyz0123456789._-", max_size=80))
def test_any_size_byte_identical(tmp_path_factory: pytest.TempPathFactory, sectors: int,
                                 backing: str) -> None:
    same_as_qemu_img(tmp_path_factory.mktemp("q"), sectors * 512, backing)


def test_qemu_opens_and_checks_it(tmp_path: Path) -> None:
    """A chain of two written here: QEMU reads through to the base, and both check clean."""
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(base)],
                   check=True, capture_output=True)
    top = tmp_path / "top.qcow2"
    qcow2.create(top, 1 << 20, "base.qcow2")
    subprocess.run(["qemu-img", "check", "-q", str(top)], check=True)
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 64k", str(top)],
                         check=True, capture_output=True, text=True).stdout
    assert "read 65536/65536 bytes" in out
    info = subprocess.run(["qemu-img", "info", str(top)], check=True, capture_output=True,
                          text=True).stdout
    assert "backing file: base.qcow2" in info and "backing file format: qcow2" in info


@pytest.mark.parametrize("size,backing", [(0, ""), (1000, ""), (-512, ""),
                                          (1 << 20, "x" * 1024), (1 << 20, "a\0b")])
def test_unsupported_is_refused_without_a_file(tmp_path: Path, size: int, backing: str) -> None:
    with pytest.raises(qcow2.Unsupported):
        qcow2.create(tmp_path / "x.qcow2", size, backing)
    assert not (tmp_path / "x.qcow2").exists()
