"""The libvirt backend: libvirt's checkpoint and backup API for block jobs and
checkpoints, libvirt's guest-agent and suspend/resume for quiesce."""

from .vm import LibvirtVm

__all__ = ["LibvirtVm"]
