"""A small ext4 file system on a loop device, for an agent's ``images`` directory: the
tests fill it up (a real ENOSPC under the hypervisor's copy) or freeze it (every write
to it waits until the thaw, so a copy is held while it runs).

Mounted with ``-o loop`` (the loop device is detached when the last mount of it goes).
A libvirt domain's QEMU runs in a private mount namespace that holds a copy of the
mounts of its start: mount before the domain starts, unmount after it stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import time
from pathlib import Path

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)


class SmallFs:
    """One loop-mounted ext4 image; :meth:`close` thaws and unmounts it (idempotent)."""

    def __init__(self, image: Path, size: int = 24 << 20) -> None:
        self.image = image
        self.size = size
        self.at: Path | None = None
        self.frozen = False
        self.ballast: Path | None = None

    def mount(self, at: Path) -> None:
        """Make *at* (created if missing) the mount point of a fresh file system."""
        assert self.at is None
        at.mkdir(parents=True, exist_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(self.size)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
                        str(self.image)], check=True)
        subprocess.run(["mount", "-o", "loop,noatime", str(self.image), str(at)], check=True)
        self.at = at

    def _ioctl(self, op: int) -> None:
        assert self.at is not None
        fd = os.open(self.at, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, op, 0)
        finally:
            os.close(fd)

    def freeze(self) -> None:
        """Every write to the file system waits from now until :meth:`thaw`."""
        self._ioctl(FIFREEZE)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            self._ioctl(FITHAW)
            self.frozen = False

    def free(self) -> int:
        assert self.at is not None
        st = os.statvfs(self.at)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int) -> None:
        """Allocate a ballast file so that only about *leave* bytes stay free."""
        assert self.at is not None and self.ballast is None
        self.ballast = self.at / "ballast"
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.free() - leave)
            os.fsync(fd)
        finally:
            os.close(fd)

    def unfill(self) -> None:
        if self.ballast is not None:
            self.ballast.unlink(missing_ok=True)
            self.ballast = None

    def files(self) -> set[str]:
        """Every regular file on the file system, relative to its root."""
        assert self.at is not None
        return {str(p.relative_to(self.at)) for p in self.at.rglob("*") if p.is_file()}

    def close(self) -> None:
        if self.at is None:
            return
        with contextlib.suppress(OSError):
            self.thaw()
        for _ in range(50):  # a process that just let go of a file may still hold it
            if subprocess.run(["umount", str(self.at)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(self.at)], check=False)
        self.at = None
        self.image.unlink(missing_ok=True)
