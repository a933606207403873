"""Append-only JSON-lines files with fsync: the journal and the catalog both use it.

A record is durable once its whole line, newline included, is fsynced. After a power
loss the last line may be torn (a prefix of a record, or a record without its
newline): that record was never acknowledged, so it is cut off before the next
append. A bad line with complete lines after it cannot come from a torn write: it is
an error, and the agent stops instead of silently forgetting what follows."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import JournalError

log = logging.getLogger(__name__)


def fsync_file(path: Path) -> None:
    """Make a file's data durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory entry (a created, renamed or deleted file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_FIELDS: dict[type, tuple[str, ...]] = {}  # a dataclass' field names
_LEAVES = frozenset({str, int, float, bool, type(None)})


def plain(value: Any) -> Any:
    """*value* (a dataclass, possibly nested in tuples, lists and dicts) as JSON-able
    dicts and lists: ``dataclasses.asdict`` without its deep copy of every leaf value,
    which made a transaction's journal records of a hundred disks cost milliseconds."""
    kind = type(value)
    if kind in _LEAVES:
        return value
    names = _FIELDS.get(kind)
    if names is None and dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = _FIELDS[kind] = tuple(f.name for f in dataclasses.fields(value))
    if names is not None:
        return {n: plain(getattr(value, n)) for n in names}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


class JsonLines:
    """One file of JSON records, one per line, appended and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._durable: int | None = None  # bytes of whole records, once read

    def read(self) -> list[dict[str, Any]]:
        """Every durable record, oldest first (a torn last line is not one).

        Raises:
            JournalError: a corrupt record with whole records after it.
        """
        try:
            data = self.path.read_bytes() if self.path.exists() else b""
        except OSError as err:
            raise JournalError(f"{self.path}: cannot read: {err}") from err
        end = data.rfind(b"\n") + 1  # whole lines end here; bytes after it are torn
        lines = data[:end].split(b"\n")[:-1]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as err:
                if number == len(lines) and end == len(data):
                    end -= len(line) + 1  # the last line, garbled by the write in flight
                    break
                raise JournalError(f"{self.path}: line {number} is corrupt ({err}); "
                                   "refusing to guess what follows") from err
            records.append(record)
        self._durable = end
        return records

    def append(self, records: Iterable[dict[str, Any]], sync: bool = True) -> None:
        """Write *records* and fsync them before returning (a torn tail is cut first).
        With *sync* False they are only written (they outlive this process, not a
        crash of the host, until the next fsync of the file).

        Raises:
            JournalError: the file holds a corrupt record, or cannot be written.
        """
        data = b"".join(_line(r) for r in records)
        if not data:
            return
        try:
            if self._fd is None:
                if self._durable is None:
                    self.read()
                assert self._durable is not None
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                size = os.fstat(self._fd).st_size
                if size > self._durable:
                    log.warning("%s: cutting a torn last record (%d bytes) before appending",
                                self.path, size - self._durable)
                    os.ftruncate(self._fd, self._durable)
                    os.fsync(self._fd)
            left = memoryview(data)
            while left:  # a full disk may take part of it and say so only by the count
                left = left[os.write(self._fd, left):]
            if sync:
                os.fsync(self._fd)
        except OSError as err:  # e.g. the disk is full: nothing was promised
            self.close()
            self._durable = None  # a partial write is a torn tail: cut at the next append
            raise JournalError(f"{self.path}: cannot write: {err}") from err

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
        self._durable = None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
