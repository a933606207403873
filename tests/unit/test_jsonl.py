"""Journal and catalog files after a power loss: a torn last record is cut off before
the next append; a corrupt record in the middle stops the agent, never a silent cut."""

from __future__ import annotations

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
