"""The QEMU backend: QMP for block jobs and checkpoints, qemu-ga for freeze/thaw."""

from .vm import QemuVm

__all__ = ["QemuVm"]
