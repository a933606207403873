"""Append-only JSON-lines files with fsync: the journal and the catalog both use it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a directory entry (a created, renamed or deleted file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


class JsonLines:
    """One file of JSON records, one per line, appended and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None

    def read(self) -> list[dict[str, Any]]:
        """Every complete record, oldest first (reading stops at a torn line)."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_bytes().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                break  # torn write at the tail: the change it described never happened
        return records

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Write *records* and fsync them before returning."""
        data = b"".join(_line(r) for r in records)
        if not data:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(self._fd, data)
        os.fsync(self._fd)

    def rewrite(self, records: Iterable[dict[str, Any]]) -> None:
        """Atomically replace the file with *records* (compaction)."""
        self.close()
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(_line(r) for r in records))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
