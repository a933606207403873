"""Registration with the coordinator replicas, repeated as this agent's heartbeat."""

from __future__ import annotations

import asyncio
import logging

import grpc

from blocktxn.v1 import coordinator_pb2 as cpb

from .config import AgentConfig
from .replicas import Replicas
from .runner import AgentRunner
from .service import inventory_to_pb

log = logging.getLogger(__name__)


async def register_forever(runner: AgentRunner, config: AgentConfig,
                           replicas: Replicas) -> None:
    """Announce this agent and its inventory to a coordinator replica, every few
    seconds (the interval the coordinator asks for); move to the next replica on error."""
    interval = 3.0
    while True:
        try:
            reply = await replicas.stub().RegisterAgent(cpb.RegisterAgentRequest(
                agent_id=config.agent_id, address=config.advertise or config.listen,
                inventory=await inventory_to_pb(runner)), timeout=5)
            interval = reply.heartbeat_s or interval
        except grpc.aio.AioRpcError as err:
            log.warning("registration with %s failed: %s", replicas.current,
                        err.details() or err.code().name)
            replicas.failed()
            interval = 1.0
        await asyncio.sleep(interval)
