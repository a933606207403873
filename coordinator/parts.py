"""How a transaction record and a backup set are kept in etcd: a small header and one
part per agent, so that no etcd value grows with a transaction's size and a change of
one agent's share (its vote, its members' progress) rewrites only that part.

Keys (see store.py)::

    PREFIX/txn/<id>              the record's header: every field but the per-agent ones
    PREFIX/member/<id>/<agent>   the agent's share: address, members (each with its
                                 place in the record), vote, committed, images
    PREFIX/set/<id>              the set's header: every field but images and agents
    PREFIX/image/<id>/<agent>    the agent's images of the set

A header whose members (images) are empty was written with parts: a transaction has at
least one member and a set at least one image. A header of an earlier version holds
everything itself and has no parts; it reads as it was written.

Pure: the store reads and writes the bytes (``Store.put_txn``: parts first, in
requests of at most ``BATCH_BYTES``, the header last)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from .errors import StoreCorruptError
from .records import BackupSet, MemberRecord, SetImage, TxnRecord, VoteRecord

#: bytes of values (and ops) in one etcd request of a split write: well under etcd's
#: 1.5 MiB --max-request-bytes, and its 128 --max-txn-ops
BATCH_BYTES = 512 << 10
BATCH_OPS = 100


@dataclass(frozen=True)
class TxnPart:
    """One agent's share of a transaction record (PREFIX/member/<txn>/<agent>)."""

    agent_id: str
    address: str
    members: tuple[MemberRecord, ...]
    at: tuple[int, ...]               # each member's place in the record's members
    vote: VoteRecord | None = None
    committed: bool = False
    images: tuple[SetImage, ...] = ()
    image_at: tuple[int, ...] = ()    # each image's place in the record's images


@dataclass(frozen=True)
class SetPart:
    """One agent's images of a backup set (PREFIX/image/<set>/<agent>)."""

    set_id: str
    agent_id: str
    images: tuple[SetImage, ...]
    at: tuple[int, ...] = ()          # each image's place in the set's images


def split_txn(record: TxnRecord) -> tuple[TxnRecord, dict[str, TxnPart]]:
    """The header of *record* and each agent's part."""
    votes = {v.agent_id: v for v in record.votes}
    committed = set(record.committed)
    places: dict[str, list[int]] = {a: [] for a in record.agent_ids}
    for i, m in enumerate(record.members):
        places.setdefault(m.agent_id, []).append(i)
    images = _places(record.images)
    addresses = dict(record.agents)
    parts = {a: TxnPart(a, addresses.get(a, ""), tuple(record.members[i] for i in at),
                        tuple(at), votes.get(a), a in committed,
                        tuple(record.images[i] for i in images.get(a, ())),
                        tuple(images.get(a, ())))
             for a, at in places.items()}
    header = replace(record, members=(), agents=(), votes=(), committed=(), images=())
    return header, parts


def join_txn(header: TxnRecord, parts: Iterable[TxnPart], where: str) -> TxnRecord:
    """The record *header* and its *parts* were split from (an earlier version's record,
    whole in its header, as it is).

    Raises:
        StoreCorruptError: a header of parts without them, or parts that do not fit.
    """
    if header.members:
        return header
    parts = sorted(parts, key=lambda p: p.agent_id)
    places = [i for p in parts for i in p.at]
    if not parts or sorted(places) != list(range(len(places))) or any(
            len(p.at) != len(p.members) for p in parts):
        raise StoreCorruptError(f"{where}: the members of its parts are missing or "
                                "do not fit together")
    members: list[MemberRecord | None] = [None] * len(places)
    for p in parts:
        for i, m in zip(p.at, p.members, strict=True):
            members[i] = m
    votes = sorted((p.vote for p in parts if p.vote is not None),
                   key=lambda v: (v.at, v.agent_id))
    return replace(header, members=tuple(m for m in members if m is not None),
                   agents=tuple((p.agent_id, p.address) for p in parts),
                   votes=tuple(votes),
                   committed=tuple(p.agent_id for p in parts if p.committed),
                   images=_in_place([(p.images, p.image_at) for p in parts]))


def _places(images: tuple[SetImage, ...]) -> dict[str, list[int]]:
    """agent id -> the places of its images in *images*."""
    places: dict[str, list[int]] = {}
    for i, image in enumerate(images):
        places.setdefault(image.agent_id, []).append(i)
    return places


def _in_place(shares: list[tuple[tuple[SetImage, ...], tuple[int, ...]]]
              ) -> tuple[SetImage, ...]:
    """The images of *shares* (each with their places) in their places; by share when
    the places do not fit (an image's place is only its order, never its meaning)."""
    placed = sorted((at, n) for images, places in shares
                    for n, at in enumerate(places[:len(images)]))
    if len(placed) != sum(len(images) for images, _ in shares) or [
            at for at, _ in placed] != list(range(len(placed))):
        return tuple(i for images, _ in shares for i in images)
    by_place: dict[int, SetImage] = {}
    for images, places in shares:
        by_place.update(zip(places, images, strict=False))
    return tuple(by_place[i] for i in range(len(placed)))


def split_set(backup_set: BackupSet) -> tuple[BackupSet, dict[str, SetPart]]:
    """The header of *backup_set* and each agent's part."""
    images = _places(backup_set.images)
    return (replace(backup_set, images=(), agents=()),
            {a: SetPart(backup_set.set_id, a, tuple(backup_set.images[i] for i in at),
                        tuple(at)) for a, at in images.items()})


def join_set(header: BackupSet, parts: Iterable[SetPart], where: str) -> BackupSet:
    """The set *header* and its *parts* were split from (an earlier version's set as it
    is).

    Raises:
        StoreCorruptError: a header of parts without any.
    """
    if header.images:
        return header
    parts = sorted(parts, key=lambda p: p.agent_id)
    images = _in_place([(p.images, p.at) for p in parts])
    if not images:
        raise StoreCorruptError(f"{where}: the images of its parts are missing")
    return replace(header, images=images,
                   agents=tuple(sorted({p.agent_id for p in parts if p.images})))


def one_request(sizes: list[int], final_ops: int) -> bool:
    """Whether a split write of parts of *sizes*, then *final_ops* header writes, goes
    as one request (see ``requests``)."""
    return sum(sizes) <= BATCH_BYTES and len(sizes) + final_ops <= BATCH_OPS


def requests(sizes: list[int], final: int, final_ops: int) -> list[int]:
    """The bytes of each request of a split write (``Store._put_split``): parts of
    *sizes*, then *final_ops* header writes of *final* bytes in all; the parts in
    ``batches`` first unless everything fits one request."""
    if one_request(sizes, final_ops):
        return [sum(sizes) + final]
    return [sum(sizes[i] for i in run) for run in batches(sizes)] + [final]


def batches(sizes: list[int], budget: int = BATCH_BYTES, most: int = BATCH_OPS
            ) -> list[list[int]]:
    """The indexes of *sizes* in order, cut into runs of at most *most* whose sizes add
    up to at most *budget* (a single larger one makes a run of its own)."""
    runs: list[list[int]] = []
    run: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        if run and (total + size > budget or len(run) >= most):
            runs.append(run)
            run, total = [], 0
        run.append(i)
        total += size
    if run:
        runs.append(run)
    return runs
