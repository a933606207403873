"""Registration with the coordinator replicas, repeated as this agent's heartbeat."""

from __future__ import annotations

import asyncio
import logging

import grpc

from blocktxn.v1 import coordinator_pb2 as cpb
from blocktxn.v1 import coordinator_pb2_grpc as cpb_grpc

from .config import AgentConfig
from .runner import AgentRunner
from .service import inventory_to_pb

log = logging.getLogger(__name__)


async def register_forever(runner: AgentRunner, config: AgentConfig) -> None:
    """Announce this agent and its inventory to a coordinator replica, every few
    seconds (the interval the coordinator asks for); move to the next replica on error."""
    assert config.coordinator
    replicas = [a.strip() for a in config.coordinator.split(",") if a.strip()]
    channels = [config.tls.channel(a) for a in replicas]
    interval, turn = 3.0, 0
    try:
        while True:
            stub = cpb_grpc.CoordinatorServiceStub(channels[turn % len(channels)])
            try:
                reply = await stub.RegisterAgent(cpb.RegisterAgentRequest(
                    agent_id=config.agent_id, address=config.advertise or config.listen,
                    inventory=await inventory_to_pb(runner)), timeout=5)
                interval = reply.heartbeat_s or interval
            except grpc.aio.AioRpcError as err:
                log.warning("registration with %s failed: %s", replicas[turn % len(replicas)],
                            err.details() or err.code().name)
                interval, turn = 1.0, turn + 1
            await asyncio.sleep(interval)
    finally:
        for channel in channels:
            await channel.close(None)
