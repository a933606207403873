"""A real Linux guest for the tests and ``blocktxn demo --real-guests``: built from Debian
packages (image.py), booted under QEMU (vm.py), reached through its qemu-guest-agent
(qga.py); what its restored disks must hold (records.py)."""
