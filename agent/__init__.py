"""The blocktxn agent: one host's two-phase-commit participant over QEMU block jobs."""
