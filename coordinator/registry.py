"""The agents this coordinator knows: registration on a lease (an agent that stops
heartbeating is lost after AGENT_TTL), their entries, and one client per agent."""

from __future__ import annotations

import time
from typing import Any

from blocktxn.ids import check_id
from blocktxn.tls import TlsFiles

from .agent_client import AgentClient
from .errors import NotFoundError, RequestError
from .records import AgentEntry, AgentInventory
from .store import Store

AGENT_TTL = 10


class AgentRegistry:
    """Agent entries in etcd and a cache of clients, keyed by (agent id, address)."""

    def __init__(self, store: Store, tls: TlsFiles) -> None:
        self.store = store
        self.tls = tls
        self._leases: dict[str, Any] = {}
        self._clients: dict[tuple[str, str], AgentClient] = {}

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
        key = (agent_id, address)
        if key not in self._clients:
            self._clients[key] = AgentClient(agent_id, address, tls=self.tls)
        return self._clients[key]

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
