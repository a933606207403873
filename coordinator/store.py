"""etcd adapter: every durable state of the coordinator, under one key prefix, as
typed records in and out; the one place that encodes them.

Keys (values are JSON with ``schema``)::

    PREFIX/leader               replica name, on the leader's lease
    PREFIX/txn/<id>             transaction record: its header (coordinator/parts.py)
    PREFIX/member/<id>/<agent>  ... and each agent's part of it (written before the header)
    PREFIX/request/<req>        request id -> txn id (written with the record)
    PREFIX/decision/<id>        the decision: created once, never changed
    PREFIX/set/<id>             backup set: its header (written with the final record)
    PREFIX/image/<id>/<agent>   ... and each agent's images (written before the header)
    PREFIX/agent/<id>           agent address + inventory (written when they change)
    PREFIX/live/<id>            present while the agent's heartbeats arrive: on the
                                lease of the replica that hears it, value its lease id

Every transaction-state write compares the leader key's create revision with
the writer's epoch (fencing): a deposed leader can write nothing. A value that
does not decode raises StoreCorruptError.

etcd stays small: a heartbeat writes nothing unless the agent changed (the lease
keepalive does not make a revision); every listing reads in pages of ``PAGE`` keys;
finished transaction records are collected (``collect_finished``); backup sets stay.
A full etcd (NOSPACE alarm) raises StoreFullError, an outage to wait out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions
import grpc
from aetcd import rpc as etcd_rpc
from aetcd.utils import prefix_range_end

from blocktxn import failpoints

from .encoding import decode as _decode
from .encoding import dump as _dump
from .encoding import text as _text
from .errors import (
    ConfigError,
    NotFoundError,
    NotLeaderError,
    StoreCorruptError,
    StoreFullError,
    StoreRejectedError,
    StoreUnavailableError,
)
from .etcd_client import EtcdAccess, EtcdClient
from .parts import (
    SetPart,
    TxnPart,
    batches,
    join_set,
    join_txn,
    one_request,
    split_set,
    split_txn,
)
from .planner import txn_id_at
from .records import (
    AgentEntry,
    AuditRecord,
    BackupSet,
    DecisionRecord,
    PruneRecord,
    ScheduleState,
    TxnRecord,
)
from .txn_messages import TxnPhase

log = logging.getLogger(__name__)
#: gRPC codes of an etcd request that a retry cannot fix (RESOURCE_EXHAUSTED: a message
#: over gRPC's size limit; etcd's NOSPACE has that code too, but is _NOSPACE below).
_REJECTED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})
#: what etcd answers to a request whose auth token expired, or was issued before a user
#: or role changed: log in again and retry
_TOKEN = ("invalid auth token", "revision of auth store is old")
#: what etcd answers to a write while its NOSPACE alarm is raised
_NOSPACE = "database space exceeded"
FULL_HINT = ("etcd is full (NOSPACE alarm): writes wait until an operator compacts, "
             "defragments and disarms it (deploy/CONFIGURATION.md, 'etcd upkeep')")
#: keys per range request: no listing comes back as one response near gRPC's 4 MiB
#: limit, however many records etcd holds
PAGE = 500
#: keys per range request of parts (coordinator/parts.py: tens of KiB each, never more
#: than one request: 1.5 MiB), so that a page is always less than MAX_REPLY
PART_PAGE = 10
#: bytes of one etcd reply this client takes (gRPC's default: 4 MiB)
MAX_REPLY = 16 << 20
KEEPALIVE_MS = 10_000  # ms between pings on an open call: twice etcd's minimum of 5 s
#: finished records deleted per fenced etcd transaction (4 deletes each; etcd's
#: --max-txn-ops is 128 by default)
COLLECT_BATCH = 25
#: etcd's default --max-request-bytes (1.5 MiB): a larger request is refused for good
ETCD_MAX_REQUEST = 1536 << 10
#: room left for the keys, the fence compare and gRPC's framing of the final write
REQUEST_MARGIN = 32 << 10
PREFIX = "/blocktxn/v1/"
#: s after which the parts of a transaction without a header are deleted (its creation
#: stopped between them and its header; no creation takes that long)
ORPHAN_AFTER = 3600.0
#: records whose written parts a replica remembers (to write only what changed)
WRITTEN_KEPT = 256
T = TypeVar("T")
R = TypeVar("R")
H = TypeVar("H")   # a header (TxnRecord, BackupSet)
P = TypeVar("P")   # its part (TxnPart, SetPart)


@dataclasses.dataclass(frozen=True)
class EtcdStatus:
    """What the etcd member we reach says about itself."""

    alarms: tuple[str, ...]   # e.g. "memberID:... alarm:NOSPACE"; () when none
    db_size: int              # bytes of its database file
    revision: int


def _key(*parts: str) -> bytes:
    return (PREFIX + "/".join(parts)).encode()


def parse_endpoints(endpoints: str) -> tuple[str, int]:
    """The aetcd host and port for ``host:port[,host:port...]``.

    Raises:
        ConfigError: no endpoint, or a port that is not a number.
    """
    hosts = [e.strip().removeprefix("http://") for e in endpoints.split(",") if e.strip()]
    if not hosts:
        raise ConfigError("no etcd endpoint")
    if len(hosts) == 1:
        host, _, port = hosts[0].rpartition(":")
    else:  # a gRPC target that lists every member: ipv4:h1:p1,h2:p2,...
        host, _, port = ("ipv4:" + ",".join(hosts)).rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"etcd endpoint {endpoints!r} is not host:port[,host:port...]")
    return host, int(port)


class Store:
    """A connection to etcd with deadlines on every call."""

    def __init__(self, endpoints: str, timeout: float = 5.0, page: int = PAGE,
                 observe: Callable[[str, float, str], None] | None = None,
                 access: EtcdAccess | None = None) -> None:
        """*observe(what, seconds, outcome)* sees every request (outcome ``ok``,
        ``unavailable``, ``rejected`` or ``full``).

        Raises: ConfigError for malformed *endpoints*."""
        host, port = parse_endpoints(endpoints)
        self._args = (endpoints, timeout, page, observe, access)
        self.timeout = timeout
        self.page = page
        self.observe = observe
        self.client = EtcdClient(
            host, port, access or EtcdAccess(), timeout=int(max(1, timeout)),
            # etcd refuses pings closer than --grpc-keepalive-min-time (5 s) and any ping
            # while no call is open, answering a third with GOAWAY "too_many_pings" (seen
            # in a scale run with a 5 s interval: jitter put two pings under 5 s apart).
            # Ping at twice its minimum, and only while a call or stream is open: every
            # call has its own deadline, so an idle connection needs no ping.
            options={"grpc.keepalive_time_ms": KEEPALIVE_MS, "grpc.keepalive_timeout_ms": 5000,
                     "grpc.keepalive_permit_without_calls": 0,
                     "grpc.max_receive_message_length": MAX_REPLY},
        )
        self.tx = self.client.transactions
        self.quarantined: dict[str, str] = {}  # key -> why it was left out of listings
        # txn id -> (epoch, key -> value) of the parts last written (see put_txn)
        self._written: dict[str, tuple[int, dict[bytes, bytes]]] = {}

    def twin(self) -> Store:
        """A new Store like this one (its own connection, for another thread's loop)."""
        return Store(*self._args)

    async def _call(self, what: str, make: Callable[[], Awaitable[T]]) -> T:
        """One etcd request with a deadline.

        Raises:
            StoreRejectedError: etcd refused it for good (too large, invalid, denied).
            StoreFullError: etcd's NOSPACE alarm is raised (a write waits for an operator).
            StoreUnavailableError: anything else: etcd may answer a retry.
        """
        start, outcome = time.monotonic(), "cancelled"
        channel = self.client.channel
        # a task of our own whose error is always retrieved: when the caller is cancelled
        # (a client gave up on its RPC), the request it leaves behind may still fail
        request = asyncio.ensure_future(make())
        request.add_done_callback(_retrieve)
        try:
            reply = await asyncio.wait_for(request, self.timeout)
            outcome = "ok"
            return reply
        except (TimeoutError, aetcd.exceptions.ClientError, grpc.RpcError, OSError) as err:
            rpc = err if isinstance(err, grpc.aio.AioRpcError) else err.__cause__
            if isinstance(rpc, grpc.aio.AioRpcError) and any(
                    t in (rpc.details() or "") for t in _TOKEN):
                outcome = "unavailable"
                await self.client.reauthenticate(channel)  # log in again, then retry
                raise StoreUnavailableError(f"etcd {what}: {rpc.details()}") from err
            if isinstance(rpc, grpc.aio.AioRpcError) and _NOSPACE in (rpc.details() or ""):
                outcome = "full"
                raise StoreFullError(f"etcd {what}: {FULL_HINT}: {rpc.details()}") from err
            if isinstance(err, (aetcd.exceptions.InvalidArgumentError,
                                aetcd.exceptions.UnauthenticatedError)) or (
                    isinstance(rpc, grpc.aio.AioRpcError) and rpc.code() in _REJECTED):
                detail = rpc.details() if isinstance(rpc, grpc.aio.AioRpcError) else str(err)
                outcome = "rejected"
                raise StoreRejectedError(f"etcd {what}: request refused: {detail}") from err
            outcome = "unavailable"
            raise StoreUnavailableError(f"etcd {what}: {err or type(err).__name__}") from err
        finally:
            if self.observe is not None:
                self.observe(what, time.monotonic() - start, outcome)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.client.close(), 2)
        except Exception as err:  # closing is best effort
            log.debug("etcd close: %s", err)

    async def _range(self, what: str, start: bytes, end: bytes) -> list[Any]:
        """Every key-value in [*start*, *end*), in key order (see ``_ranges``).

        Raises:
            StoreUnavailableError.
        """
        return (await self._ranges(what, [(start, end)]))[0]

    async def _ranges(self, what: str, spans: list[tuple[bytes, bytes]],
                      pages: tuple[int, ...] = ()) -> list[list[Any]]:
        """Every key-value in each [start, end) of *spans*, in key order, read in pages
        of ``page`` keys (or the span's in *pages*; each request continues after the last
        key of the one before),
        all at the revision of the first page, so the listings are one consistent
        snapshot; read again if etcd compacted that revision meanwhile.

        Raises:
            StoreUnavailableError.
        """
        for _ in range(3):
            found: list[list[Any]] = []
            revision = 0
            try:
                for n, (start, end) in enumerate(spans):
                    out: list[Any] = []
                    key = start
                    page = pages[n] if n < len(pages) else self.page
                    while True:
                        reply = await self._call(what, functools.partial(
                            self._page, key, end, revision, page))
                        out += reply.kvs
                        # (a reply's header names etcd's newest revision, not the one read)
                        revision = revision or int(reply.header.revision)
                        if not reply.more or not reply.kvs:
                            break
                        key = bytes(reply.kvs[-1].key) + b"\0"
                    found.append(out)
                return found
            except StoreUnavailableError as err:
                cause = err.__cause__
                if not (isinstance(cause, grpc.aio.AioRpcError)
                        and cause.code() == grpc.StatusCode.OUT_OF_RANGE):
                    raise
                log.info("etcd %s: revision %d compacted meanwhile: reading again", what,
                         revision)
        raise StoreUnavailableError(f"etcd {what}: compacted under every attempt")

    async def _page(self, key: bytes, end: bytes, revision: int, page: int) -> Any:
        await self.client.connect()
        return await self.client.kvstub.Range(
            etcd_rpc.RangeRequest(key=key, range_end=end, limit=page, revision=revision),
            timeout=self.timeout, metadata=self.client.metadata)

    async def status(self) -> EtcdStatus:
        """The reached member's alarms (NOSPACE, CORRUPT), database size and revision;
        a read that goes through no raft round.

        Raises:
            StoreUnavailableError.
        """
        async def ask() -> Any:
            await self.client.connect()
            return await self.client.maintenancestub.Status(
                etcd_rpc.StatusRequest(), timeout=self.timeout, metadata=self.client.metadata)

        reply = await self._call("status", ask)
        return EtcdStatus(tuple(e for e in reply.errors if "alarm" in e.lower()),
                          int(reply.dbSize), int(reply.header.revision))

    # --------------------------------------------------------------- leader
    async def lease(self, ttl: int) -> Any:
        """Raises: StoreUnavailableError."""
        return await self._call("lease", lambda: self.client.lease(ttl))

    async def refresh_id(self, lease_id: int) -> bool:
        """Keep the lease *lease_id* alive; False if it has expired.

        Raises:
            StoreUnavailableError.
        """
        reply = await self._call("keepalive", lambda: self.client.refresh_lease(lease_id))
        return bool(reply is not None and reply.TTL > 0)

    async def try_lead(self, name: str, lease: Any) -> int | None:
        """Create the leader key if absent; return the epoch if we now lead.

        Raises:
            StoreUnavailableError.
        """
        key = _key("leader")
        ok, _ = await self._call("campaign", lambda: self.client.transaction(
            compare=[self.tx.create(key) == 0],
            success=[self.tx.put(key, name.encode(), lease)], failure=[]))
        if not ok:
            return None
        got = await self._call("get leader", lambda: self.client.get(key))
        if got is None or got.value != name.encode():
            return None
        return int(got.create_revision)

    async def leader(self) -> tuple[str, int] | None:
        """The leader key's value and epoch. Raises: StoreUnavailableError."""
        got = await self._call("get leader", lambda: self.client.get(_key("leader")))
        return None if got is None else (_text(got.value, "leader"), int(got.create_revision))

    async def resign(self, lease: Any) -> None:
        """Raises: StoreUnavailableError."""
        await self._call("revoke", lease.revoke)

    async def _fenced(self, what: str, epoch: int, ops: list[Any]) -> None:
        ok, _ = await self._call(what, lambda: self.client.transaction(
            compare=[self.tx.create(_key("leader")) == epoch], success=ops, failure=[]))
        if not ok:
            raise NotLeaderError(f"{what}: rejected, this replica no longer leads (epoch {epoch})")

    # ---------------------------------------------------------- transactions
    async def create_txn(self, epoch: int, record: TxnRecord) -> str | None:
        """Write a new record (its parts, then its header with its request-id index);
        return an existing txn id if the request id is known already.

        Raises:
            NotLeaderError, StoreUnavailableError, StoreCorruptError.
        """
        req_key = _key("request", record.request_id)
        existing = await self._call("get request", lambda: self.client.get(req_key))
        if existing is not None:
            return _text(existing.value, req_key)
        header, parts = split_txn(record)
        values = {_key("member", record.txn_id, a): _dump(p) for a, p in parts.items()}
        final = [self.tx.put(_key("txn", record.txn_id), _dump(header)),
                 self.tx.put(req_key, record.txn_id.encode())]
        ok = await self._put_split("create txn", epoch, list(values.items()), final,
                                   [self.tx.create(req_key) == 0])
        if not ok:
            members = _key("member", record.txn_id) + b"/"  # written apart, if large
            await self._call("drop parts", lambda: self.client.delete_range(
                members, prefix_range_end(members)))
            again = await self._call("get request", lambda: self.client.get(req_key))
            if again is not None:
                return _text(again.value, req_key)
            raise NotLeaderError("create txn: rejected, this replica no longer leads")
        self._remember(record.txn_id, epoch, values)
        try:
            failpoints.hit("lose_create_reply")
        except failpoints.FailpointError as err:  # as if etcd's reply never came back
            raise StoreUnavailableError(f"create txn: {err}") from err
        return None

    async def put_txn(self, epoch: int, record: TxnRecord,
                      backup_set: BackupSet | None = None) -> None:
        """Replace the record (and write the backup set), fenced on *epoch*: the parts
        that changed since this replica's last write of it, then the headers (the set is
        listed from its header's write on, which is the record's).

        Raises:
            NotLeaderError, StoreUnavailableError, StoreRejectedError.
        """
        header, parts = split_txn(record)
        values = {_key("member", record.txn_id, a): _dump(p) for a, p in parts.items()}
        final = [self.tx.put(_key("txn", record.txn_id), _dump(header))]
        if backup_set is not None:
            set_header, set_parts = split_set(backup_set)
            values.update({_key("image", backup_set.set_id, a): _dump(p)
                           for a, p in set_parts.items()})
            final.append(self.tx.put(_key("set", backup_set.set_id), _dump(set_header)))
        mine, written = self._written.pop(record.txn_id, (epoch, {}))
        changed = [(k, v) for k, v in values.items()
                   if mine != epoch or written.get(k) != v]
        await self._put_split("put txn", epoch, changed, final)
        if record.phase != TxnPhase.DONE:
            self._remember(record.txn_id, epoch, values)

    def _remember(self, txn_id: str, epoch: int, values: dict[bytes, bytes]) -> None:
        """What this replica wrote of *txn_id*'s parts under *epoch* (the next write
        leaves out what did not change); of the last WRITTEN_KEPT records only."""
        self._written[txn_id] = (epoch, values)
        while len(self._written) > WRITTEN_KEPT:
            self._written.pop(next(iter(self._written)))

    async def _put_split(self, what: str, epoch: int, parts: list[tuple[bytes, bytes]],
                         final: list[Any], compare: tuple[Any, ...] | list[Any] = ()
                         ) -> bool:
        """Put *parts*, then *final*, fenced on *epoch*: in one request when all fits
        ``BATCH_BYTES``, else the parts in such requests first (``parts.requests``).
        Return whether *compare* held for the final request (then it was written).

        Raises:
            NotLeaderError, StoreUnavailableError, StoreRejectedError.
        """
        sizes = [len(k) + len(v) for k, v in parts]
        puts = [self.tx.put(k, v) for k, v in parts]
        if one_request(sizes, len(final)):
            final, puts = puts + final, []
        for run in batches(sizes):
            if puts:
                await self._fenced(what, epoch, [puts[i] for i in run])
        leader = self.tx.create(_key("leader")) == epoch
        ok, _ = await self._call(what, functools.partial(
            self.client.transaction, compare=[leader, *compare], success=final, failure=[]))
        if not ok and not compare:
            raise NotLeaderError(f"{what}: rejected, this replica no longer leads "
                                 f"(epoch {epoch})")
        return bool(ok)

    async def get_txn(self, txn_id: str) -> TxnRecord | None:
        """Raises: StoreUnavailableError, StoreCorruptError."""
        return await self._get_joined("txn", "member", txn_id, TxnRecord, TxnPart, join_txn)

    async def txns(self) -> list[TxnRecord]:
        """Every record; a malformed one is quarantined (see ``_records``).

        Raises: StoreUnavailableError."""
        return await self._list_joined("txn", "member", TxnRecord, TxnPart, join_txn)

    async def _get_joined(self, kind: str, parts: str, owner: str, header: type[H],
                          part: type[P], join: Callable[[H, list[P], str], H]) -> H | None:
        """The *kind* record of *owner* joined with its *parts* (coordinator/parts.py),
        read at one revision.

        Raises: StoreUnavailableError, StoreCorruptError."""
        key, start = _key(kind, owner), _key(parts, owner) + b"/"
        headers, found = await self._ranges(f"get {kind}", [
            (key, key + b"\0"), (start, prefix_range_end(start))], (self.page, PART_PAGE))
        if not headers:
            return None
        return join(_decode(headers[0].value, key, header),
                    [_decode(kv.value, kv.key, part) for kv in found], key.decode())

    async def _list_joined(self, kind: str, parts: str, header: type[H], part: type[P],
                           join: Callable[[H, list[P], str], H]) -> list[H]:
        """Every *kind* record joined with its *parts*, read at one revision; a malformed
        one is quarantined.

        Raises: StoreUnavailableError."""
        start, parts_start = _key(kind) + b"/", _key(parts) + b"/"
        headers, found = await self._ranges(f"list {kind}", [
            (start, prefix_range_end(start)),
            (parts_start, prefix_range_end(parts_start))], (self.page, PART_PAGE))
        return self._joined(self._records(headers, header), self._records(found, part),
                            parts_start, join)

    def _joined(self, headers: list[tuple[Any, H]], parts: list[tuple[Any, P]],
                prefix: bytes, join: Callable[[H, list[P], str], H]) -> list[H]:
        """Each header joined with its parts (keys *prefix*<owner>/<agent>); one whose
        parts do not fit is quarantined like a malformed value."""
        owned: dict[str, list[P]] = {}
        for kv, part in parts:
            owner = bytes(kv.key)[len(prefix):].decode(errors="replace").split("/")[0]
            owned.setdefault(owner, []).append(part)
        out = []
        for kv, header in headers:
            key = bytes(kv.key).decode(errors="replace")
            try:
                out.append(join(header, owned.get(key.rsplit("/", 1)[-1], []), key))
            except StoreCorruptError as err:
                if key not in self.quarantined:
                    log.error("quarantined (left out until repaired): %s", err)
                self.quarantined[key] = str(err)
        return out

    async def _prefix(self, kind: str, record: type[R]) -> list[R]:
        """Every *kind* record, read in pages (``_range``); a malformed one is
        quarantined (``_records``).

        Raises:
            StoreUnavailableError.
        """
        start = _key(kind) + b"/"
        kvs = await self._range(f"list {kind}", start, prefix_range_end(start))
        return [r for _, r in self._records(kvs, record)]

    def _records(self, kvs: list[Any], record: type[R]) -> list[tuple[Any, R]]:
        """Each key-value with its decoded record; a malformed one is quarantined: logged
        with its key and left out, so that one bad value cannot stop a listing or a new
        leader."""
        out = []
        for kv in kvs:
            try:
                out.append((kv, _decode(kv.value, kv.key, record)))
            except StoreCorruptError as err:
                key = bytes(kv.key).decode(errors="replace")
                if key not in self.quarantined:
                    log.error("quarantined (left out until repaired): %s", err)
                self.quarantined[key] = str(err)
        return out

    async def collect_finished(self, epoch: int, before: float, limit: int = 1000) -> int:
        """Delete the finished (DONE) transaction records created before *before* (unix
        time), each with its decision and request-id keys, fenced on *epoch*,
        ``COLLECT_BATCH`` records per etcd transaction, at most *limit* per call; return
        how many went. Backup sets stay. Only keys below the id of time *before* are read
        (an id starts with its creation time), so once the old records are gone a pass
        reads next to nothing. A repeated request id makes a new transaction after this.

        Raises:
            NotLeaderError, StoreUnavailableError.
        """
        bound = txn_id_at(before, 0).rsplit("-", 1)[0]
        start, members = _key("txn") + b"/", _key("member") + b"/"
        headers, parts = await self._ranges("list finished", [
            (start, _key("txn", bound)), (members, _key("member", bound))], (self.page, PART_PAGE))
        orphan = txn_id_at(min(before, time.time() - ORPHAN_AFTER), 0).rsplit("-", 1)[0]
        await self._drop_orphans(epoch, {bytes(kv.key)[len(start):] for kv in headers}, {
            owner for kv in parts
            if (owner := bytes(kv.key)[len(members):].split(b"/")[0]) < orphan.encode()})
        old = [(kv, r) for kv, r in self._records(headers, TxnRecord)
               if r.phase == TxnPhase.DONE and r.created_at < before][:limit]
        collected = 0
        for i in range(0, len(old), COLLECT_BATCH):
            batch = old[i:i + COLLECT_BATCH]
            compare = [self.tx.create(_key("leader")) == epoch,
                       *(self.tx.mod(bytes(kv.key)) == int(kv.mod_revision) for kv, _ in batch)]
            ops = [self.tx.delete(k) for kv, r in batch for k in (
                bytes(kv.key), _key("decision", r.txn_id), _key("request", r.request_id))]
            ops += [self.tx.delete(k, prefix_range_end(k)) for k in (
                _key("member", r.txn_id) + b"/" for _, r in batch)]
            ok, _ = await self._call("collect", functools.partial(
                self.client.transaction, compare=compare, success=ops, failure=[]))
            if not ok:
                current = await self.leader()
                if current is None or current[1] != epoch:
                    raise NotLeaderError("collect: rejected, this replica no longer leads")
                log.info("collect: a record changed meanwhile; left for the next pass")
                continue
            collected += len(batch)
        return collected

    async def _drop_orphans(self, epoch: int, records: set[bytes], owners: set[bytes]
                            ) -> None:
        """Delete the parts of transactions without a header (a creation that stopped
        between its parts and its header: its request id was never written, so nothing
        can take the transaction up again), fenced on *epoch*.

        Raises:
            NotLeaderError, StoreUnavailableError.
        """
        for owner in sorted(owners - records)[:COLLECT_BATCH]:
            log.info("collect: parts of %s, a transaction never created", owner.decode(
                errors="replace"))
            parts = _key("member") + b"/" + owner + b"/"
            await self._fenced("collect", epoch, [
                self.tx.delete(parts, prefix_range_end(parts))])

    # -------------------------------------------------------------- decision
    async def decide(self, decision: DecisionRecord, epoch: int | None) -> DecisionRecord:
        """Create the decision if none exists; return the durable one.

        With *epoch* the write is fenced on leadership; without (presumed abort
        by any replica past the deadline) only create-if-absent guards it.

        Raises:
            NotLeaderError, StoreUnavailableError, StoreCorruptError,
            NotFoundError: a presumed abort for a record that is gone (collected).
        """
        txn_id = decision.txn_id
        key = _key("decision", txn_id)
        compare = [self.tx.create(key) == 0]
        if epoch is not None:
            compare.append(self.tx.create(_key("leader")) == epoch)
        else:  # never a decision for a record collected meanwhile (collect_finished)
            compare.append(self.tx.version(_key("txn", txn_id)) > 0)
        ok, _ = await self._call("decide", lambda: self.client.transaction(
            compare=compare, success=[self.tx.put(key, _dump(decision))],
            failure=[]))
        current = await self.get_decision(txn_id)
        if current is None:
            if epoch is None:
                raise NotFoundError(f"unknown transaction {txn_id}")
            raise NotLeaderError("decision write rejected: this replica no longer leads")
        if not ok:
            log.info("txn %s: decision already durable: %s", txn_id, current.decision.value)
        return current

    async def get_decision(self, txn_id: str) -> DecisionRecord | None:
        """Raises: StoreUnavailableError, StoreCorruptError."""
        key = _key("decision", txn_id)
        got = await self._call("get decision", lambda: self.client.get(key))
        return None if got is None else _decode(got.value, key, DecisionRecord)

    # ------------------------------------------------------------------ sets
    async def get_set(self, set_id: str) -> BackupSet | None:
        """Raises: StoreUnavailableError, StoreCorruptError."""
        return await self._get_joined("set", "image", set_id, BackupSet, SetPart, join_set)

    async def sets(self) -> list[BackupSet]:
        """Every set; a malformed one is quarantined (see ``_records``).

        Raises: StoreUnavailableError."""
        return await self._list_joined("set", "image", BackupSet, SetPart, join_set)

    # ---------------------------------------------------------------- agents
    async def get_agent(self, agent_id: str) -> tuple[AgentEntry | None, int]:
        """The entry of *agent_id* and its mod revision (0: no entry). A malformed entry
        is quarantined and reads as None (with its revision: a registration replaces it).

        Raises:
            StoreUnavailableError.
        """
        key = _key("agent", agent_id)
        got = await self._call("get agent", lambda: self.client.get(key))
        if got is None:
            return None, 0
        found = self._records([got], AgentEntry)
        return (found[0][1] if found else None), int(got.mod_revision)

    async def agent_unchanged(self, agent_id: str, token: bytes, mod: int) -> bool:
        """Whether the agent's liveness key still holds *token* (the lease this replica
        keeps alive) and its entry is still the one at revision *mod*: then a heartbeat
        has nothing to write. A read-only etcd transaction: no revision, no raft round.

        Raises:
            StoreUnavailableError.
        """
        ok, _ = await self._call("heartbeat", lambda: self.client.transaction(
            compare=[self.tx.value(_key("live", agent_id)) == token,
                     self.tx.mod(_key("agent", agent_id)) == mod], success=[], failure=[]))
        return bool(ok)

    async def register_agent(self, agent_id: str, entry: AgentEntry | None, lease: Any,
                             token: bytes, expect: int) -> int | None:
        """Put the agent's liveness key (*token*, on *lease*) and, if given, its *entry*,
        in one etcd transaction, if the entry is still at revision *expect* (0: none).
        Return the entry's mod revision after it, or None if another replica changed the
        entry meanwhile (read it again).

        Raises:
            StoreUnavailableError.
        """
        key = _key("agent", agent_id)
        ops = [self.tx.put(_key("live", agent_id), token, lease)]
        if entry is not None:
            ops.append(self.tx.put(key, _dump(entry)))
        ops.append(self.tx.get(key))
        ok, replies = await self._call("register", lambda: self.client.transaction(
            compare=[self.tx.mod(key) == expect], success=ops, failure=[]))
        if not ok:
            return None
        got = replies[-1]  # the range: [(value, kv)]
        return int(got[0][1].mod_revision) if got else 0

    async def agents(self) -> tuple[list[AgentEntry], set[str]]:
        """Every registered agent, and the ids of those whose lease is alive.

        Raises:
            StoreUnavailableError, StoreCorruptError.
        """
        return await self.agent_entries(), set(await self.live_leases())

    async def agent_entries(self) -> list[AgentEntry]:
        """Every registered agent, live or not.

        Raises:
            StoreUnavailableError.
        """
        return await self._prefix("agent", AgentEntry)

    async def live_leases(self) -> dict[str, int]:
        """The id of each live agent -> the lease its liveness key is on.

        Raises:
            StoreUnavailableError, StoreCorruptError.
        """
        start = _key("live") + b"/"
        live = await self._range("list live", start, prefix_range_end(start))
        return {_text(bytes(kv.key), "live key").rsplit("/", 1)[1]: int(kv.lease)
                for kv in live}

    async def lease_age(self, lease_id: int) -> float | None:
        """Seconds since lease *lease_id* was last kept alive (its granted TTL minus its
        remaining TTL, to the second); None if it has expired.

        Raises:
            StoreUnavailableError.
        """
        info = await self._call("lease ttl", lambda: self.client.get_lease_info(
            lease_id, keys=False))
        if info.TTL <= 0:
            return None
        return float(max(0, int(info.grantedTTL) - int(info.TTL)))


    # --- prunes (the coordinator's removal of backup sets; see coordinator/pruner.py)
    async def start_prune(self, epoch: int, prune: PruneRecord, sets: list[BackupSet]
                          ) -> None:
        """The intent and every set marked ``removing``, in one fenced write, before
        any agent changes a file.

        Raises:
            NotLeaderError, StoreUnavailableError, StoreRejectedError.
        """
        ops = [self.tx.put(_key("prune", prune.prune_id), _dump(prune))]
        for s in sets:  # (the parts again: a set of an earlier version had none)
            header, parts = split_set(s)
            ops += [self.tx.put(_key("image", s.set_id, a), _dump(p)) for a, p in parts.items()]
            ops.append(self.tx.put(_key("set", s.set_id),
                                   _dump(dataclasses.replace(header, removing=prune.prune_id))))
        await self._fenced("start prune", epoch, ops)

    async def set_removed(self, epoch: int, prune: PruneRecord, set_id: str
                          ) -> PruneRecord | None:
        """Every agent has removed *set_id*: its record goes, and the intent shrinks
        (or goes too, with its last set). Return what is left of the intent.

        Raises:
            NotLeaderError, StoreUnavailableError.
        """
        left = tuple(s for s in prune.set_ids if s != set_id)
        images = _key("image", set_id) + b"/"
        ops = [self.tx.delete(_key("set", set_id)),
               self.tx.delete(images, prefix_range_end(images))]
        rest = dataclasses.replace(prune, set_ids=left) if left else None
        ops.append(self.tx.put(_key("prune", prune.prune_id), _dump(rest)) if rest
                   else self.tx.delete(_key("prune", prune.prune_id)))
        await self._fenced("set removed", epoch, ops)
        return rest

    async def prunes(self) -> list[PruneRecord]:
        """Unfinished prunes. Raises: StoreUnavailableError, StoreCorruptError."""
        return await self._prefix("prune", PruneRecord)
    # --- end prunes

    # ----------------------------------------------------------------- audit
    async def put_audit(self, record: AuditRecord) -> None:
        """Any replica writes the calls it served (keys sort by time).

        Raises: StoreUnavailableError, StoreRejectedError."""
        key = _key("audit", f"{int(record.at * 1e6):020d}-{random.getrandbits(32):08x}")
        await self._call("put audit", lambda: self.client.put(key, _dump(record)))

    async def audit(self, since: float, limit: int) -> list[AuditRecord]:
        """At most *limit* records from *since* on, oldest first.

        Raises: StoreUnavailableError."""
        start = _key("audit", f"{int(max(0.0, since) * 1e6):020d}")
        end = prefix_range_end(_key("audit") + b"/")

        async def ask() -> Any:
            await self.client.connect()
            return await self.client.kvstub.Range(
                etcd_rpc.RangeRequest(key=start, range_end=end, limit=limit),
                timeout=self.timeout, metadata=self.client.metadata)

        reply = await self._call("list audit", ask)
        return [r for _, r in self._records(list(reply.kvs), AuditRecord)]

    async def collect_audit(self, epoch: int, before: float, most: int) -> int:
        """Delete audit records older than *before*, then the oldest past the newest
        *most*; return how many went (two or three requests, however many).

        Raises: NotLeaderError, StoreUnavailableError."""
        start = _key("audit") + b"/"
        end = prefix_range_end(start)
        old_end = _key("audit", f"{int(before * 1e6):020d}")

        async def count(until: bytes) -> int:
            async def ask() -> Any:
                await self.client.connect()
                return await self.client.kvstub.Range(
                    etcd_rpc.RangeRequest(key=start, range_end=until, count_only=True),
                    timeout=self.timeout, metadata=self.client.metadata)
            return int((await self._call("count audit", ask)).count)

        gone = await count(old_end)
        total = await count(end) - gone
        cut = old_end
        if total > most:
            async def oldest() -> Any:
                await self.client.connect()
                return await self.client.kvstub.Range(
                    etcd_rpc.RangeRequest(key=old_end, range_end=end, limit=total - most,
                                          keys_only=True),
                    timeout=self.timeout, metadata=self.client.metadata)
            kvs = list((await self._call("list audit", oldest)).kvs)
            if kvs:
                cut = bytes(kvs[-1].key) + b"\0"
                gone += len(kvs)
        if gone:
            await self._fenced("collect audit", epoch, [self.tx.delete(start, range_end=cut)])
        return gone

    # ------------------------------------------------------------- schedules
    async def schedule_states(self) -> list[ScheduleState]:
        """Raises: StoreUnavailableError."""
        return await self._prefix("schedule", ScheduleState)

    async def put_schedule_state(self, epoch: int, state: ScheduleState) -> None:
        """Raises: NotLeaderError, StoreUnavailableError."""
        await self._fenced("put schedule", epoch,
                           [self.tx.put(_key("schedule", state.name), _dump(state))])

    async def drop_schedule_states(self, epoch: int, names: list[str]) -> None:
        """Forget schedules no longer configured. Raises: NotLeaderError,
        StoreUnavailableError."""
        if names:
            await self._fenced("drop schedules", epoch,
                               [self.tx.delete(_key("schedule", n)) for n in names])

    async def txn_of_request(self, request_id: str) -> str | None:
        """The transaction a request id started, while its record is kept.

        Raises: StoreUnavailableError, StoreCorruptError."""
        key = _key("request", request_id)
        got = await self._call("get request", lambda: self.client.get(key))
        return None if got is None else _text(got.value, key)


def _retrieve(request: asyncio.Future[Any]) -> None:
    """Mark a finished request's error as seen (the caller may be gone)."""
    if not request.cancelled():
        request.exception()


async def retry_while_unavailable(call: Callable[[], Awaitable[T]]) -> T:
    """*call* until etcd answers: a write that must happen (a decision, a removal's
    step) waits out an outage (quorum lost: bitmaps are safe meanwhile) or a full etcd
    (its alarm is reported by health), with backoff up to 2 s (10 s while full).

    Raises:
        anything but StoreUnavailableError.
    """
    delay = 0.1
    while True:
        try:
            return await call()
        except StoreFullError as err:
            log.warning("etcd is full, retrying: %s", err)
            await asyncio.sleep(delay)
            delay = min(10.0, delay * 2)
        except StoreUnavailableError as err:
            log.warning("etcd unavailable, retrying: %s", err)
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)

async def leader_name(endpoints: str) -> str | None:
    """The replica name held in the leader key, or None (for tools and tests).

    Raises:
        StoreUnavailableError, ConfigError.
    """
    store = Store(endpoints)
    try:
        got = await store.leader()
    finally:
        await store.close()
    return None if got is None else got[0].partition("@")[0]
