"""Journal and catalog files after a power loss: a torn last record is cut off before
the next append; a corrupt record in the middle stops the agent, never a silent cut."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blocktxn.agent.errors import JournalError
from blocktxn.agent.jsonl import JsonLines


def test_a_torn_tail_is_truncated_before_the_next_append(tmp_path: Path) -> None:
    f = JsonLines(tmp_path / "j.jsonl")
    f.append([{"n": 1}, {"n": 2}])
    f.close()
    whole = f.path.read_bytes()
    f.path.write_bytes(whole + b'{"n": 3, "half')  # power lost while writing record 3
    again = JsonLines(f.path)
    assert again.read() == [{"n": 1}, {"n": 2}]  # record 3 never happened
    again.append([{"n": 4}])
    again.close()
    assert JsonLines(f.path).read() == [{"n": 1}, {"n": 2}, {"n": 4}]


def test_a_torn_tail_without_newline_of_a_whole_record_is_cut_too(tmp_path: Path) -> None:
    f = JsonLines(tmp_path / "j.jsonl")
    f.append([{"n": 1}])
    f.close()
    f.path.write_bytes(f.path.read_bytes() + b'{"n": 2}')  # no newline: not known durable
    again = JsonLines(f.path)
    assert again.read() == [{"n": 1}]
    again.append([{"n": 3}])
    assert JsonLines(f.path).read() == [{"n": 1}, {"n": 3}]


def test_a_corrupt_record_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": \x00\n{"n": 3}\n')
    with pytest.raises(JournalError, match=r"j.jsonl.*line 2"):
        JsonLines(path).read()


def test_a_write_cut_short_by_a_full_disk_is_a_torn_tail_not_a_corrupt_middle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk can make write() store only part of the records and return the short
    count (no error): found by the chaos run (repository full during a commit), where
    the next records were glued onto the part and the catalog was corrupt in the middle;
    the agent would then refuse to start."""
    import errno

    f = JsonLines(tmp_path / "c.jsonl")
    f.append([{"n": 1}])
    real_write = os.write
    calls = []

    def full_disk(fd: int, data: bytes | memoryview) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:7]))  # the space left: a short write
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)  # what jsonl calls
    with pytest.raises(JournalError):
        f.append([{"n": 2, "pad": "x" * 40}, {"n": 3}])
    monkeypatch.setattr(os, "write", real_write)
    f.append([{"n": 4}])
    assert JsonLines(tmp_path / "c.jsonl").read() == [{"n": 1}, {"n": 4}]


def test_an_unsynced_append_is_written_at_once_and_synced_by_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sync=False (the journal's Freezing marker): in the file for any reader (it outlives
    the process) with no fsync; the next synced append fsyncs the file, both records."""
    f = JsonLines(tmp_path / "j.jsonl")
    f.append([{"n": 1}])
    syncs: list[int] = []
    real = os.fsync

    def counted(fd: int) -> None:
        syncs.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counted)
    f.append([{"n": 2}], sync=False)
    assert syncs == [] and JsonLines(f.path).read() == [{"n": 1}, {"n": 2}]
    f.append([{"n": 3}])
    assert len(syncs) == 1 and JsonLines(f.path).read() == [{"n": 1}, {"n": 2}, {"n": 3}]
