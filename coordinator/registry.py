"""The agents this coordinator knows: registration on a lease (an agent that stops
heartbeating is lost after AGENT_TTL), their entries, and one client per agent."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from blocktxn.ids import check_id
from blocktxn.tls import TlsFiles

from .agent_client import AgentClient
from .errors import NotFoundError, RequestError, StoreCorruptError, StoreUnavailableError
from .records import AgentEntry, AgentInventory
from .store import Store

AGENT_TTL = 10
ADDRESSES_KEPT = 2  # clients kept per agent (its current and previous address)


class AgentRegistry:
    """Agent entries in etcd and a cache of clients, keyed by (agent id, address)."""

    def __init__(self, store: Store, tls: TlsFiles) -> None:
        self.store = store
        self.tls = tls
        self._leases: dict[str, Any] = {}
        self._clients: dict[tuple[str, str], AgentClient] = {}
        self._closing: set[asyncio.Future[None]] = set()

    async def register(self, agent_id: str, address: str, inventory: AgentInventory) -> None:
        """Record the agent and renew its liveness lease (a heartbeat).

        Raises:
            IdentifierError, RequestError, StoreUnavailableError.
        """
        check_id(agent_id, "agent id")
        if not address:
            raise RequestError("agent address is empty")
        lease = self._leases.get(agent_id)
        if lease is None or not await self.store.refresh(lease):
            lease = await self.store.lease(AGENT_TTL)
            self._leases[agent_id] = lease
        await self.store.register_agent(AgentEntry(agent_id, address, inventory, time.time()),
                                        lease)

    async def entries(self) -> tuple[list[AgentEntry], set[str]]:
        """Every registered agent and the ids of the live ones.

        Raises:
            StoreUnavailableError, StoreCorruptError.
        """
        return await self.store.agents()

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
            entries, _ = await self.store.agents()
        except (StoreUnavailableError, StoreCorruptError):
            entries = []
        entry = next((e for e in entries if e.agent_id == agent_id), None)
        return self.client(agent_id, entry.address if entry else recorded)

    async def owner(self, agent_id: str) -> AgentClient:
        """A client of the registered agent *agent_id*.

        Raises:
            NotFoundError, StoreUnavailableError, StoreCorruptError.
        """
        entries, _ = await self.store.agents()
        entry = next((e for e in entries if e.agent_id == agent_id), None)
        if entry is None:
            raise NotFoundError(f"unknown agent {agent_id!r}")
        return self.client(agent_id, entry.address)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
