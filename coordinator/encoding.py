"""How records are stored in etcd: JSON objects whose keys are their field names, and
the bound on the largest write a transaction can make."""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import types
import typing
from dataclasses import MISSING
from typing import Any, TypeVar

from .errors import StoreCorruptError
from .parts import BATCH_BYTES, one_request, split_set, split_txn
from .records import (
    MAX_ERROR_TEXT,
    MAX_ERRORS,
    MAX_MEMBER_TEXT,
    MAX_REASON_TEXT,
    MAX_VOTE_TEXT,
    BackupSet,
    SetImage,
    TxnRecord,
    VoteRecord,
)
from .txn_messages import Decision, TxnPhase

SCHEMA = 1
KEY_ROOM = 256   # bytes allowed for a key (PREFIX, kind, ids) and its framing
R = TypeVar("R")

# ------------------------------------------------------------------ encoding
# A record is a JSON object whose keys are its field names (as earlier versions
# wrote them): enums by value, no decision as "", the (agent, address) pairs of a
# transaction as an object, tuples as lists. A missing key takes the field's default.
_PAIRS = tuple[tuple[str, str], ...]


def final_write_bound(record: TxnRecord) -> int:
    """Bytes of the largest etcd request this transaction can make: its final write as
    the store splits it (coordinator/parts.py; each agent's share of the record and of
    the set in requests of at most BATCH_BYTES, a larger share alone, then both
    headers), every free text at its bound, every number at its widest, KEY_ROOM for
    each key. A transaction is refused up front when this exceeds what etcd takes: it
    could never be decided."""
    final, backup_set = worst_final_write(record)
    header, parts = split_txn(final)
    set_header, set_parts = split_set(backup_set)
    items = [len(dump(p)) + KEY_ROOM for p in (*parts.values(), *set_parts.values())]
    headers = len(dump(header)) + len(dump(set_header)) + 2 * KEY_ROOM
    if one_request(items, 2):
        return sum(items) + headers
    # smaller real sizes may pack differently, but no request of parts passes
    # BATCH_BYTES but for a single larger part, and a single request holds all below it
    return max(BATCH_BYTES + headers, max(items))


def largest_value_bound(record: TxnRecord) -> int:
    """Bytes of the largest etcd value this transaction can write (see
    final_write_bound): a header, or one agent's part."""
    final, backup_set = worst_final_write(record)
    header, parts = split_txn(final)
    set_header, set_parts = split_set(backup_set)
    return max(len(dump(v)) for v in (header, set_header, *parts.values(),
                                      *set_parts.values()))


def worst_final_write(record: TxnRecord) -> tuple[TxnRecord, BackupSet]:
    """*record* as its largest final write could hold it (see final_write_bound)."""
    big, when = 2 ** 63 - 1, 1.0e9 + 0.123456789

    def image(m: Any) -> SetImage:
        path = f"images/{m.vm}/{m.disk}/{record.txn_id}.qcow2"
        return SetImage(m.agent_id, m.vm, m.disk, path, path, "incremental", big, big,
                        "0" * 64, when, f"blocktxn:{record.txn_id}")

    images = tuple(image(m) for m in record.members)
    final = dataclasses.replace(
        record, phase=TxnPhase.DONE, decision=Decision.COMMIT,
        reason="x" * MAX_REASON_TEXT, committed=record.agent_ids,
        votes=tuple(VoteRecord(a, True, "x" * MAX_VOTE_TEXT) for a in record.agent_ids),
        errors=("x" * MAX_ERROR_TEXT,) * MAX_ERRORS, frozen_from=when, thawed_at=when,
        set_id=record.txn_id, images=images,
        members=tuple(dataclasses.replace(
            m, chosen="incremental", mode_reason="x" * MAX_MEMBER_TEXT, status="prepared",
            done=big, total=big, outcome="committed") for m in record.members))
    return final, BackupSet.of(record.txn_id, images, record.group, when)


def dump(record: object) -> bytes:
    return json.dumps({"schema": SCHEMA, **_json_of(record)}, separators=(",", ":")).encode()


_PLAIN = frozenset({str, int, float, bool})


@functools.cache
def _fields(kind: Any) -> tuple[tuple[str, Any], ...] | None:
    """(name, type hint) of each field of dataclass *kind*; None for another type."""
    if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
        return None
    hints = _hints(kind)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(kind))


def _json_of(value: Any, hint: Any = None) -> Any:
    kind: Any = type(value)
    if kind in _PLAIN:
        return value
    if kind is tuple:
        if hint == _PAIRS:
            return dict(value)
        return [_json_of(v) for v in value]
    fields = _fields(kind)
    if fields is not None:
        return {name: _json_of(getattr(value, name), h) for name, h in fields}
    if isinstance(value, enum.Enum):
        return value.value
    if value is None:
        return ""
    return value


def text(raw: bytes, where: object) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as err:
        raise StoreCorruptError(f"{where!r}: not UTF-8") from err


def decode(raw: bytes, key: object, kind: type[R]) -> R:
    """Raises: StoreCorruptError for anything but a *kind* record of this schema."""
    try:
        value = json.loads(raw)
        if not isinstance(value, dict) or value.get("schema") != SCHEMA:
            raise ValueError(f"not a record of schema {SCHEMA}")
        record: R = _read(kind, value)
        return record
    except (ValueError, TypeError, KeyError) as err:
        raise StoreCorruptError(f"malformed value at {key!r}: {err}") from err


@functools.cache
def _hints(kind: type) -> dict[str, Any]:
    return typing.get_type_hints(kind)


@functools.cache
def _shape(hint: Any) -> tuple[str, Any]:
    """How ``_read`` reads a value of type *hint*: (kind, detail)."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        hints = _hints(hint)
        return "record", tuple((f.name, hints[f.name], f.default is MISSING
                                and f.default_factory is MISSING)
                               for f in dataclasses.fields(hint))
    if isinstance(hint, types.UnionType):
        return "optional", typing.get_args(hint)[0]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "enum", None
    if typing.get_origin(hint) is tuple:
        return ("pairs", None) if hint == _PAIRS else ("tuple", typing.get_args(hint)[0])
    return "plain", None


def _read(hint: Any, value: Any) -> Any:
    """*value* (decoded JSON) as an instance of the type *hint*.

    Raises:
        ValueError, TypeError, KeyError: it is not one.
    """
    if type(value) is hint and hint in _PLAIN:
        return value
    shape, detail = _shape(hint)
    if shape == "record":
        if not isinstance(value, dict):
            raise TypeError(f"{hint.__name__}: {value!r} is not an object")
        return hint(**{name: _read(h, value[name]) for name, h, required in detail
                       if required or name in value})
    if shape == "optional":  # an optional enum or record: "" is None
        return None if value in ("", None) else _read(detail, value)
    if shape == "enum":
        return hint(value)
    if shape == "pairs":
        if not isinstance(value, dict):
            raise TypeError(f"{value!r} is not an object")
        return tuple(sorted((str(k), _read(str, v)) for k, v in value.items()))
    if shape == "tuple":
        if not isinstance(value, list):
            raise TypeError(f"{value!r} is not a list")
        return tuple(_read(detail, v) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, str) and value.isdigit():
        return int(value)  # proto JSON writes uint64 as a string
    if type(value) is not hint:
        raise TypeError(f"{value!r} is not a {hint.__name__}")
    return value
