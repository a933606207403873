"""Registration with the coordinator replicas, repeated as this agent's heartbeat.

A heartbeat never waits for QEMU: the inventory (which asks every VM for its disks and
checkpoints) is taken by its own task every few seconds into a cache, and a heartbeat
sends only the cache's digest, with the inventory itself only when the digest changed
since the current replica last accepted one (or when the replica asks for it). Each
call has a deadline of HEARTBEAT_DEADLINE and a failed one is retried after
RETRY_AFTER, so that a slow answer still leaves a second chance inside the coordinator's
lease on the agent (it keeps it for two heartbeat intervals after each heartbeat, and
the lease lives 10 s after its last keepalive)."""

from __future__ import annotations

import asyncio
import hashlib
import logging

import grpc

from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb

from .config import AgentConfig
from .replicas import Replicas
from .runner import AgentRunner
from .service import inventory_to_pb

log = logging.getLogger(__name__)
HEARTBEAT_S = 3.0            # until the coordinator's reply says otherwise
HEARTBEAT_DEADLINE = 5.0     # per RegisterAgent call
RETRY_AFTER = 0.5            # after a failed call (then the next replica)
INVENTORY_EVERY = 3.0        # the cached inventory is taken again this often
INVENTORY_TIMEOUT = 30.0     # one inventory may take this long (a busy QEMU)


class InventoryCache:
    """The last inventory taken, and its digest."""

    def __init__(self) -> None:
        self.inventory: apb.Inventory | None = None
        self.digest = ""
        self.taken = asyncio.Event()

    def set(self, inventory: apb.Inventory) -> None:
        self.inventory = inventory
        self.digest = hashlib.sha256(
            inventory.SerializeToString(deterministic=True)).hexdigest()[:32]
        self.taken.set()


async def keep_inventory(runner: AgentRunner, cache: InventoryCache) -> None:
    """Take the inventory into *cache* every INVENTORY_EVERY seconds."""
    while True:
        try:
            cache.set(await asyncio.wait_for(inventory_to_pb(runner), INVENTORY_TIMEOUT))
        except TimeoutError:
            log.warning("inventory: not taken within %.0fs (the last one is sent)",
                        INVENTORY_TIMEOUT)
        await asyncio.sleep(INVENTORY_EVERY)


async def register_forever(runner: AgentRunner, config: AgentConfig,
                           replicas: Replicas) -> None:
    """Announce this agent to a coordinator replica every few seconds (the interval
    the coordinator asks for), its inventory when it changed; move to the next replica
    on error."""
    cache = InventoryCache()
    keeper = asyncio.create_task(keep_inventory(runner, cache), name="inventory")
    try:
        await cache.taken.wait()
        await _heartbeats(config, replicas, cache)
    finally:
        keeper.cancel()


async def _heartbeats(config: AgentConfig, replicas: Replicas, cache: InventoryCache
                      ) -> None:
    interval = HEARTBEAT_S
    accepted = ""  # the digest whose inventory the current replica holds
    while True:
        digest, inventory = cache.digest, cache.inventory
        send = digest != accepted
        try:
            reply = await replicas.stub().RegisterAgent(cpb.RegisterAgentRequest(
                agent_id=config.agent_id, address=config.advertise or config.listen,
                inventory=inventory if send else None, inventory_digest=digest),
                timeout=HEARTBEAT_DEADLINE)
        except grpc.aio.AioRpcError as err:
            log.warning("registration with %s failed: %s", replicas.current,
                        err.details() or err.code().name)
            replicas.failed()
            accepted = ""
            await asyncio.sleep(RETRY_AFTER)
            continue
        interval = reply.heartbeat_s or interval
        if reply.send_inventory:
            accepted = ""  # at once: this heartbeat did not count
            continue
        if send:
            accepted = digest
        await asyncio.sleep(interval)
