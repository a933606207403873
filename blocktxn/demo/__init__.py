"""The self-contained demo cluster (`blocktxn demo`) and its lab of real QEMU VMs,
also used by the tests; never imported by the daemons."""
