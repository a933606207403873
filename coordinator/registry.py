"""The agents this coordinator knows: registration on a lease (an agent that stops
heartbeating is lost after AGENT_TTL), their entries, and one client per agent.

An agent sends its inventory only when it changed (by its digest, see the proto); a
heartbeat without one is answered from what this replica holds for the digest, or
asks for the inventory. A heartbeat costs etcd no revision while nothing changes: it
keeps this replica's lease for the agent alive (a keepalive is no write) and checks,
in one read-only etcd transaction, that the agent's liveness key is still on that
lease and its entry still the one this replica last wrote or read. Only a new lease,
a changed address or inventory, another replica's write, or an entry older than
SEEN_REFRESH is written.
The repository's free space counts as changed only once it moved by more than
1/FREE_SLACK of its capacity from the stored value (it drifts with every file
written on the host; rounded alone, it flaps across a rounding step)."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from blocktxn.ids import check_id
from blocktxn.tls import TlsFiles

from .agent_client import AgentClient
from .errors import (
    NotFoundError,
    RequestError,
    StoreCorruptError,
    StoreFullError,
    StoreUnavailableError,
)
from .keepalive import LeaseKeeper
from .records import AgentEntry, AgentInventory
from .store import Store

log = logging.getLogger(__name__)
#: s an agent's lease lives past its last keepalive: room for the replica's lease
#: keeper to be starved of CPU for ~14 s (a host at a load of 50, as the scale run's)
#: without an agent that heartbeats being declared lost
AGENT_TTL = 20
#: an agent heartbeats this often (the RegisterAgent reply says so): three chances
#: within AGENT_TTL, each with its own deadline, before its lease expires
HEARTBEAT_S = 3.0
#: at most this long after an agent's last heartbeat its liveness key is gone
LOST_AFTER = AGENT_TTL + 2 * HEARTBEAT_S
MAX_DIGEST = 64  # characters of an inventory digest
#: a heartbeat without inventory checks that the agent's liveness key is still on this
#: replica's lease (no other replica took it) at most this often
UNCHANGED_CHECK = 30.0
ADDRESSES_KEPT = 2  # clients kept per agent (its current and previous address)
#: an idle agent's entry (its stored last_seen) is rewritten this often: one revision an
#: hour per agent, so that a replica that never heard a lost agent still knows roughly
#: when it was last seen
SEEN_REFRESH = 3600.0
#: lease lookups at once when a listing asks when live agents were last heard
LEASE_LOOKUPS = 16
FREE_SLACK = 64


def stable(inventory: AgentInventory) -> AgentInventory:
    """*inventory* without what comes and goes while a transaction runs (busy disks,
    jobs, freezes, open transactions, free space): a change of only these is not
    written to etcd. The replica that hears the agent shows its latest inventory
    whole; the others show these fields as of the entry's last write (a new checkpoint
    is written: one write per agent per committed transaction)."""
    return replace(inventory, open_transactions=(), repo_free=0, vms=tuple(
        replace(vm, jobs=(), frozen=False, disks=tuple(
            replace(d, busy_txn="") for d in vm.disks)) for vm in inventory.vms))


def same_inventory(stored: AgentInventory, new: AgentInventory) -> bool:
    """Whether *new* says nothing that *stored* does not, but for what changes with every
    transaction (see ``stable``) and free space within slack."""
    slack = max(stored.repo_capacity, new.repo_capacity) // FREE_SLACK
    return (stable(stored) == stable(new)
            and abs(stored.repo_free - new.repo_free) <= slack)


@dataclass
class _Heard:
    """What this replica last wrote or read for one agent it hears from."""

    lease: Any
    token: bytes                # the liveness key's value: the lease id
    address: str
    inventory: AgentInventory   # as stored
    mod: int                    # the entry's mod revision as written or read here
    stored_seen: float          # the last_seen held in etcd
    seen: float                 # this replica's last heartbeat from the agent
    digest: str = ""            # the agent's digest of *inventory* as it sent it
    checked: float = 0.0        # time.monotonic() the liveness key was last checked ours
    latest: AgentInventory | None = None  # as last sent (shown by this replica)


class AgentRegistry:
    """Agent entries in etcd and a cache of clients, keyed by (agent id, address)."""

    def __init__(self, store: Store, tls: TlsFiles, keeper: LeaseKeeper) -> None:
        self.store = store
        self.keeper = keeper
        self.tls = tls
        self._heard: dict[str, _Heard] = {}
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock)
        self._clients: dict[tuple[str, str], AgentClient] = {}
        self._closing: set[asyncio.Future[None]] = set()

    async def register(self, agent_id: str, address: str, inventory: AgentInventory,
                       digest: str = "") -> None:
        """Renew the agent's liveness lease (a heartbeat); write its entry only if it
        changed (see the module's docstring). *digest*: the agent's digest of
        *inventory*, which later heartbeats name instead of sending it.

        Raises:
            IdentifierError, RequestError, StoreUnavailableError.
        """
        self._check(agent_id, address, digest)
        async with self._locks[agent_id]:
            await self._register(agent_id, address, inventory)
            heard = self._heard.get(agent_id)
            if heard is not None:
                heard.digest = digest

    async def heartbeat(self, agent_id: str, address: str, digest: str) -> bool:
        """A heartbeat that names its inventory by *digest*, on this replica's loop
        (see ``quick_heartbeat``).

        Raises:
            IdentifierError, RequestError, StoreUnavailableError.
        """
        async with self._locks[agent_id]:
            return await self.quick_heartbeat(agent_id, address, digest, self.store)

    async def quick_heartbeat(self, agent_id: str, address: str, digest: str,
                              store: Store) -> bool:
        """A heartbeat that names its inventory by *digest*: renew the agent's lease if
        this replica holds that inventory, at that address, on a live lease still
        holding the agent's liveness key, with an entry fresher than SEEN_REFRESH.
        False: nothing was done (the agent sends its inventory at once). Runs on the
        heartbeat server's thread too, with that thread's *store*: it reads and sets
        single attributes of what this replica's loop recorded (each access atomic),
        and writes nothing to etcd.

        Raises:
            IdentifierError, RequestError, StoreUnavailableError.
        """
        self._check(agent_id, address, digest)
        heard = self._heard.get(agent_id)
        if (heard is None or not digest or heard.digest != digest
                or heard.address != address
                or time.time() - heard.stored_seen >= SEEN_REFRESH
                or not self.keeper.alive(heard.lease.id)):
            return False
        now = time.monotonic()
        if now - heard.checked >= UNCHANGED_CHECK:
            if not await store.agent_unchanged(agent_id, heard.token, heard.mod):
                return False
            heard.checked = now
        self._keep(heard.lease)
        heard.seen = time.time()
        return True

    def _keep(self, lease: Any) -> None:
        """Have the keeper refresh the agent's lease for two heartbeat intervals: it
        expires AGENT_TTL after the keeper's last refresh, so an agent silent since its
        last heartbeat is lost LOST_AFTER (20-26 s) after it."""
        self.keeper.want(lease.id, AGENT_TTL, time.monotonic() + 2 * HEARTBEAT_S)

    @staticmethod
    def _check(agent_id: str, address: str, digest: str) -> None:
        check_id(agent_id, "agent id")
        if not address:
            raise RequestError("agent address is empty")
        if len(digest) > MAX_DIGEST:
            raise RequestError(f"inventory digest longer than {MAX_DIGEST} characters")

    async def _register(self, agent_id: str, address: str, inventory: AgentInventory) -> None:
        now = time.time()
        heard = self._heard.get(agent_id)
        alive = heard is not None and self.keeper.alive(heard.lease.id)
        if heard is not None and alive and heard.address == address and same_inventory(
                heard.inventory, inventory) and now - heard.stored_seen < SEEN_REFRESH:
            if await self.store.agent_unchanged(agent_id, heard.token, heard.mod):
                self._keep(heard.lease)
                heard.seen, heard.checked, heard.latest = now, time.monotonic(), inventory
                return  # nothing to write
        if heard is not None and alive:
            lease, token = heard.lease, heard.token
        else:
            if heard is not None:
                self.keeper.drop(heard.lease.id)
            lease = await self.store.lease(AGENT_TTL)
            token = f"{lease.id:x}".encode()
            self._keep(lease)
        for _ in range(3):  # another replica may write the entry between read and write
            stored, mod = await self.store.get_agent(agent_id)
            same = stored is not None and stored.address == address and same_inventory(
                stored.inventory, inventory) and now - stored.last_seen < SEEN_REFRESH
            try:
                written = await self.store.register_agent(
                    agent_id, None if same else AgentEntry(agent_id, address, inventory, now),
                    lease, token, mod)
            except StoreFullError:
                if heard is None or not alive:
                    raise
                # etcd refuses writes (reported by health): the lease keeps the agent
                # live; its entry is written by a heartbeat once etcd takes writes again
                log.debug("agent %s: entry not written: etcd is full", agent_id)
                self._keep(heard.lease)
                heard.seen, heard.latest = now, inventory
                return
            if written is not None:
                kept = stored if same and stored is not None else None
                self._keep(lease)
                self._heard[agent_id] = _Heard(
                    lease, token, address, kept.inventory if kept else inventory, written,
                    kept.last_seen if kept else now, now, checked=time.monotonic(),
                    latest=inventory)
                return
        raise StoreUnavailableError(f"register {agent_id}: its entry kept changing")

    def _with_seen(self, entry: AgentEntry) -> AgentEntry:
        """*entry* with what this replica heard since it was stored: the time of the
        agent's last heartbeat, and its latest inventory."""
        heard = self._heard.get(entry.agent_id)
        if heard is None or heard.seen <= entry.last_seen:
            return entry
        return replace(entry, last_seen=heard.seen, inventory=heard.latest or entry.inventory)

    async def entries(self) -> tuple[list[AgentEntry], set[str]]:
        """Every registered agent and the ids of the live ones. ``last_seen``: this
        replica's last heartbeat from the agent, else the time its entry was written.

        Raises:
            StoreUnavailableError, StoreCorruptError.
        """
        entries, live = await self.store.agents()
        return [self._with_seen(e) for e in entries], live

    async def listing(self) -> tuple[list[AgentEntry], set[str]]:
        """``entries()`` for display: a live agent this replica has not heard from lately
        (it heartbeats to another replica) gets its ``last_seen`` from its lease (the
        time of its last keepalive, to the second).

        Raises:
            StoreUnavailableError, StoreCorruptError.
        """
        entries = [self._with_seen(e) for e in await self.store.agent_entries()]
        leases = await self.store.live_leases()
        now = time.time()
        ask = {e.agent_id: leases[e.agent_id] for e in entries
               if e.agent_id in leases and now - e.last_seen > 2 * HEARTBEAT_S}
        limit = asyncio.Semaphore(LEASE_LOOKUPS)

        async def age(lease_id: int) -> float | None:
            async with limit:
                return await self.store.lease_age(lease_id)

        ages = dict(zip(ask, await asyncio.gather(*(age(i) for i in ask.values())),
                        strict=True))
        out = []
        for e in entries:
            got = ages.get(e.agent_id)
            out.append(e if got is None else replace(e, last_seen=max(e.last_seen, now - got)))
        return out, set(leases)

    def client(self, agent_id: str, address: str) -> AgentClient:
        """The client of *agent_id* at *address*. At most ADDRESSES_KEPT per agent are
        kept (an agent that moved is reached at its new address, while a transaction
        may still hold the old one); the least recently used beyond is closed."""
        key = (agent_id, address)
        found = self._clients.pop(key, None)
        if found is None:
            found = AgentClient(agent_id, address, tls=self.tls)
        self._clients[key] = found  # most recently used last
        mine = [k for k in self._clients if k[0] == agent_id]
        for stale in mine[:-ADDRESSES_KEPT]:
            task = asyncio.ensure_future(self._clients.pop(stale).close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return found

    async def current(self, agent_id: str, recorded: str) -> AgentClient:
        """A client at the address *agent_id* registered last; *recorded* (e.g. the
        transaction record's) if it is not registered or etcd does not answer."""
        try:
            entry, _ = await self.store.get_agent(agent_id)
        except (StoreUnavailableError, StoreCorruptError):
            entry = None
        return self.client(agent_id, entry.address if entry else recorded)

    async def owner(self, agent_id: str) -> AgentClient:
        """A client of the registered agent *agent_id*.

        Raises:
            NotFoundError, StoreUnavailableError, StoreCorruptError.
        """
        entry, _ = await self.store.get_agent(agent_id)
        if entry is None:
            raise NotFoundError(f"unknown agent {agent_id!r}")
        return self.client(agent_id, entry.address)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
