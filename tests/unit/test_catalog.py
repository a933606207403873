"""The agent's catalog: its history (add, checksum, rebase, remove) replays to the same images,
compaction keeps the file bounded, and a failed write changes nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from pathlib import Path

import pytest

from blocktxn.agent import qcow2, repository
from blocktxn.agent.checksums import Checksums
from blocktxn.agent.errors import JournalError
from blocktxn.agent.participant_messages import ImageRecord
from blocktxn.agent.repository import Repository


def image(set_id: str, backing: str = "") -> ImageRecord:
    return ImageRecord("vm1", "d0", set_id, f"images/vm1/d0/{set_id}.qcow2",
                       f"images/vm1/d0/{backing}.qcow2" if backing else "",
                       "incremental" if backing else "full", 10, 100, 1.0, f"blocktxn:{set_id}",
                       "aa")


def test_history_replays_to_the_same_catalog(tmp_path: Path) -> None:
    repo = Repository(tmp_path, [])
    repo.record([image("s1"), image("s2", "s1"), image("s3", "s2")])
    s3 = repo.images()[2]
    rebased = dataclasses.replace(s3, backing=image("s1").image, sha256="bb")
    repo._append([{"op": "rebase", "image": s3.image, "backing": rebased.backing,
                   "sha256": "bb"}], [repo.images()[0], repo.images()[1], rebased])
    repo._append([{"op": "remove", "image": image("s2").image}],
                 [repo.images()[0], rebased])
    again = Repository(tmp_path, [])
    assert again.images() == repo.images() == [image("s1"), rebased]
    assert again.last_image("vm1", "d0") == rebased
    assert again.chain_length("vm1", "d0") == 2


def fill(repo: Repository) -> int:
    return asyncio.run(Checksums(repo, asyncio.ensure_future).fill())


def test_checksums_are_taken_after_the_commit_and_replayed(tmp_path: Path) -> None:
    """Images are catalogued without a checksum (none on the transaction's path);
    fill_checksums reads each once, records it, and the history replays to it; an
    image removed before its turn is skipped, and so are an unreadable image and one
    whose header names another backing than the catalog (a rebase cut short)."""
    repo = Repository(tmp_path, [])

    def bare(set_id: str, backing: str = "", header_backing: str | None = None
             ) -> ImageRecord:
        i = dataclasses.replace(image(set_id, backing), sha256="")
        (tmp_path / i.image).parent.mkdir(parents=True, exist_ok=True)
        named = header_backing if header_backing is not None else (
            f"{backing}.qcow2" if backing else "")
        qcow2.create(tmp_path / i.image, 1 << 20, named)
        return i

    def digest(i: ImageRecord) -> str:
        return hashlib.sha256((tmp_path / i.image).read_bytes()).hexdigest()

    s1, s2, s3 = bare("s1"), bare("s2", "s1"), bare("s3", "s2")
    repo.record([s1, s2, s3])
    repo._append([{"op": "remove", "image": s2.image}], [s1, s3])
    assert fill(repo) == 2
    assert {i.image: i.sha256 for i in repo.images()} == {s1.image: digest(s1),
                                                          s3.image: digest(s3)}
    assert Repository(tmp_path, []).images() == repo.images()
    assert fill(repo) == 0      # nothing left to do
    gone, torn, later = bare("s4", "s3"), bare("s5", "s4", "s1.qcow2"), bare("s6", "s5")
    (tmp_path / gone.image).unlink()
    repo.record([gone, torn, later])
    assert fill(repo) == 1      # s4 unreadable, s5 torn: s6 still
    assert [i.sha256 for i in repo.images()][-3:] == ["", "", digest(later)]


def test_compaction_keeps_the_file_bounded(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repository, "COMPACT_SLACK", 10)
    repo = Repository(tmp_path, [])
    for n in range(200):
        repo.record([image(f"s{n}")])
        if n:
            old = image(f"s{n - 1}").image
            repo._append([{"op": "remove", "image": old}],
                         [i for i in repo.images() if i.image != old])
    lines = (tmp_path / "catalog.jsonl").read_text().count("\n")
    assert lines <= 2 * 1 + 10 + 2
    assert Repository(tmp_path, []).images() == [image("s199")]


def test_a_failed_catalog_write_changes_nothing(tmp_path: Path) -> None:
    repo = Repository(tmp_path, [])
    repo.record([image("s1")])
    repo.catalog.close()
    (tmp_path / "catalog.jsonl").unlink()
    (tmp_path / "catalog.jsonl").mkdir()  # the next write fails
    with pytest.raises(JournalError):
        repo.record([image("s2", "s1")])
    assert repo.images() == [image("s1")]  # so a retried Commit writes it again


def test_the_sums_of_a_pass_are_one_append(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    """A hundred new images: one catalog append (one fsync) for their checksums, not
    one each; an image whose disk a removal holds waits for the lock, and is recorded
    only if the removal left it catalogued without a sum."""
    repo = Repository(tmp_path, [])
    images = []
    for n in range(100):
        i = dataclasses.replace(image(f"s{n}"), disk=f"d{n}", sha256="",
                                image=f"images/vm1/d{n}/s{n}.qcow2")
        (tmp_path / i.image).parent.mkdir(parents=True, exist_ok=True)
        qcow2.create(tmp_path / i.image, 1 << 20)
        images.append(i)
    repo.record(images)
    appends: list[int] = []
    real = repo.catalog.append

    def counted(records: list[dict[str, object]]) -> None:
        records = list(records)
        appends.append(len(records))
        real(records)

    monkeypatch.setattr(repo.catalog, "append", counted)
    assert fill(repo) == 100
    assert appends == [100]
    assert all(i.sha256 for i in repo.images())

    async def held() -> tuple[int, int]:
        a, b = (dataclasses.replace(i, sha256="") for i in repo.images()[:2])
        lock = repo.lock(a.vm, a.disk)
        await lock.acquire()  # a removal of a's disk under way
        task = asyncio.ensure_future(repo.record_sums([(a, "x"), (b, "y")]))
        await asyncio.sleep(0.05)
        assert not task.done()
        lock.release()
        return await task, len(appends)

    repo._take([dataclasses.replace(i, sha256="") if n < 2 else i
                for n, i in enumerate(repo.images())])
    assert asyncio.run(held()) == (2, 3)
    assert [i.sha256 for i in repo.images()[:2]] == ["x", "y"]


def test_plain_is_asdict_for_json(tmp_path: Path) -> None:
    """The journal's and the catalog's records: what dataclasses.asdict gave, as JSON."""
    import json

    from blocktxn.agent.jsonl import plain
    from blocktxn.agent.participant_messages import Committed, Prepared

    images = tuple(image(f"s{n}") for n in range(3))
    for value in (images[0], Prepared(images, (("vm1", "d1", "why"),)), Committed(images)):
        assert json.dumps(plain(value)) == json.dumps(dataclasses.asdict(value))
