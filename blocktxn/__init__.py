"""blocktxn: all-or-nothing block backups of many QEMU VMs on many hosts."""

__version__ = "0.1.0"
