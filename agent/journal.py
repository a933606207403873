"""The participant's local journal: append-only JSON lines, fsync per record.

Replay returns the records in order; compaction keeps only the records of
transactions that are still open plus one terminal record per finished one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a directory entry (a created, renamed or deleted file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Durable record of every participant state change of one agent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and fsync it before returning."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(self._fd, json.dumps(record, separators=(",", ":")).encode() + b"\n")
        os.fsync(self._fd)

    def replay(self) -> list[dict[str, Any]]:
        """Every complete record, oldest first (a torn last line is dropped)."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_bytes().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                break  # torn write at the tail: the change it described never happened
        return records

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Atomically replace the journal with *records* (compaction)."""
        self.close()
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for r in records:
                f.write(json.dumps(r, separators=(",", ":")).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
