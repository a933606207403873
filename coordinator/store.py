"""etcd adapter: every durable state of the coordinator, under one key prefix.

Keys (values are JSON with ``schema``)::

    PREFIX/leader               replica name, on the leader's lease
    PREFIX/txn/<id>             transaction record
    PREFIX/request/<req>        request id -> txn id (written with the record)
    PREFIX/decision/<id>        the decision: created once, never changed
    PREFIX/set/<id>             backup set (written with the final record)
    PREFIX/agent/<id>           agent address + inventory
    PREFIX/live/<id>            present while the agent's heartbeats arrive (lease)

Every transaction-state write compares the leader key's create revision with
the writer's epoch (fencing): a deposed leader can write nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions
import grpc

from .errors import NotLeaderError, StoreUnavailableError

log = logging.getLogger(__name__)
SCHEMA = 1
PREFIX = "/blocktxn/v1/"
T = TypeVar("T")


def _key(*parts: str) -> bytes:
    return (PREFIX + "/".join(parts)).encode()


def _dump(value: dict[str, Any]) -> bytes:
    return json.dumps({"schema": SCHEMA, **value}, separators=(",", ":")).encode()


def _load(raw: bytes) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(raw)
    if value.get("schema") != SCHEMA:
        raise ValueError(f"unknown record schema {value.get('schema')}")
    return value


class Store:
    """A connection to etcd with deadlines on every call."""

    def __init__(self, endpoints: str, timeout: float = 5.0) -> None:
        hosts = [e.strip().removeprefix("http://") for e in endpoints.split(",") if e.strip()]
        if not hosts:
            raise ValueError("no etcd endpoint")
        if len(hosts) == 1:
            host, _, port = hosts[0].rpartition(":")
        else:  # a gRPC target that lists every member: ipv4:h1:p1,h2:p2,...
            head, _, port = ("ipv4:" + ",".join(hosts)).rpartition(":")
            host = head
        self.timeout = timeout
        self.client = aetcd.Client(
            host=host, port=int(port), timeout=int(max(1, timeout)),
            options={"grpc.keepalive_time_ms": 5000, "grpc.keepalive_timeout_ms": 5000,
                     "grpc.keepalive_permit_without_calls": 1},
        )
        self.tx = self.client.transactions

    async def _call(self, what: str, make: Callable[[], Awaitable[T]]) -> T:
        try:
            return await asyncio.wait_for(make(), self.timeout)
        except (TimeoutError, aetcd.exceptions.ClientError, grpc.RpcError, OSError) as err:
            raise StoreUnavailableError(f"etcd {what}: {err or type(err).__name__}") from err

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.client.close(), 2)
        except Exception as err:  # closing is best effort
            log.debug("etcd close: %s", err)

    # --------------------------------------------------------------- leader
    async def lease(self, ttl: int) -> Any:
        return await self._call("lease", lambda: self.client.lease(ttl))

    async def refresh(self, lease: Any) -> bool:
        """Keep *lease* alive; False if it has expired."""
        reply = await self._call("keepalive", lease.refresh)
        return bool(reply is not None and reply.TTL > 0)

    async def try_lead(self, name: str, lease: Any) -> int | None:
        """Create the leader key if absent; return the epoch if we now lead."""
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
        got = await self._call("get leader", lambda: self.client.get(_key("leader")))
        return None if got is None else (got.value.decode(), int(got.create_revision))

    async def resign(self, lease: Any) -> None:
        await self._call("revoke", lease.revoke)

    async def _fenced(self, what: str, epoch: int, ops: list[Any],
                      extra: list[Any] | None = None) -> None:
        ok, _ = await self._call(what, lambda: self.client.transaction(
            compare=[self.tx.create(_key("leader")) == epoch, *(extra or [])],
            success=ops, failure=[]))
        if not ok:
            raise NotLeaderError(f"{what}: rejected, this replica no longer leads (epoch {epoch})")

    # ---------------------------------------------------------- transactions
    async def create_txn(self, epoch: int, record: dict[str, Any]) -> str | None:
        """Write a new record and its request-id index; return an existing txn id
        if the request id is known already."""
        req_key = _key("request", record["request_id"])
        existing = await self._call("get request", lambda: self.client.get(req_key))
        if existing is not None:
            return str(existing.value.decode())
        ok, _ = await self._call("create txn", lambda: self.client.transaction(
            compare=[self.tx.create(_key("leader")) == epoch, self.tx.create(req_key) == 0],
            success=[self.tx.put(_key("txn", record["txn_id"]), _dump(record)),
                     self.tx.put(req_key, record["txn_id"].encode())], failure=[]))
        if not ok:
            again = await self._call("get request", lambda: self.client.get(req_key))
            if again is not None:
                return str(again.value.decode())
            raise NotLeaderError("create txn: rejected, this replica no longer leads")
        return None

    async def put_txn(self, epoch: int, record: dict[str, Any],
                      backup_set: dict[str, Any] | None = None) -> None:
        ops = [self.tx.put(_key("txn", record["txn_id"]), _dump(record))]
        if backup_set is not None:
            ops.append(self.tx.put(_key("set", backup_set["set_id"]), _dump(backup_set)))
        await self._fenced("put txn", epoch, ops)

    async def get_txn(self, txn_id: str) -> dict[str, Any] | None:
        got = await self._call("get txn", lambda: self.client.get(_key("txn", txn_id)))
        return None if got is None else _load(got.value)

    async def txns(self) -> list[dict[str, Any]]:
        return await self._prefix("txn")

    async def _prefix(self, kind: str) -> list[dict[str, Any]]:
        got = await self._call(f"list {kind}",
                               lambda: self.client.get_prefix(_key(kind) + b"/"))
        return [_load(kv.value) for kv in got]

    # -------------------------------------------------------------- decision
    async def decide(self, txn_id: str, decision: dict[str, Any], epoch: int | None
                     ) -> dict[str, Any]:
        """Create the decision if none exists; return the durable one.

        With *epoch* the write is fenced on leadership; without (presumed abort
        by any replica past the deadline) only create-if-absent guards it.
        """
        key = _key("decision", txn_id)
        compare = [self.tx.create(key) == 0]
        if epoch is not None:
            compare.append(self.tx.create(_key("leader")) == epoch)
        ok, _ = await self._call("decide", lambda: self.client.transaction(
            compare=compare, success=[self.tx.put(key, _dump(decision))], failure=[]))
        current = await self.get_decision(txn_id)
        if current is None:
            raise NotLeaderError("decision write rejected: this replica no longer leads")
        if not ok:
            log.info("txn %s: decision already durable: %s", txn_id, current["decision"])
        return current

    async def get_decision(self, txn_id: str) -> dict[str, Any] | None:
        got = await self._call("get decision",
                               lambda: self.client.get(_key("decision", txn_id)))
        return None if got is None else _load(got.value)

    # ------------------------------------------------------------------ sets
    async def get_set(self, set_id: str) -> dict[str, Any] | None:
        got = await self._call("get set", lambda: self.client.get(_key("set", set_id)))
        return None if got is None else _load(got.value)

    async def sets(self) -> list[dict[str, Any]]:
        return await self._prefix("set")

    # ---------------------------------------------------------------- agents
    async def register_agent(self, agent_id: str, entry: dict[str, Any], lease: Any) -> None:
        await self._call("register", lambda: self.client.transaction(
            compare=[], success=[self.tx.put(_key("agent", agent_id), _dump(entry)),
                                 self.tx.put(_key("live", agent_id), b"1", lease)],
            failure=[]))

    async def agents(self) -> tuple[list[dict[str, Any]], set[str]]:
        entries = await self._prefix("agent")
        live = await self._call("list live", lambda: self.client.get_prefix(_key("live") + b"/"))
        return entries, {kv.key.decode().rsplit("/", 1)[1] for kv in live}


async def leader_name(endpoints: str) -> str | None:
    """The replica name held in the leader key, or None (for tools and tests).

    Raises:
        StoreUnavailableError.
    """
    store = Store(endpoints)
    try:
        got = await store.leader()
    finally:
        await store.close()
    return None if got is None else got[0].partition("@")[0]
