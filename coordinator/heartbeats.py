"""The heartbeat server: RegisterAgent without inventory, served on the lease keeper's
thread (its own event loop, its own etcd connection) and port, apart from the
replica's transaction work.

An agent registers at the replica's address (with its inventory); the reply names
this server's address, and the agent's later heartbeats, which carry only the
inventory's digest, go here. Each one renews the agent's lease through the keeper
and writes nothing to etcd (``AgentRegistry.quick_heartbeat``). Anything else (an
inventory, an unknown digest, a lease gone) is answered ``send_inventory``: the agent
registers at the replica's address again. So a replica whose loop is busy for
seconds with a large transaction still hears every agent at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from blocktxn.access import AccessInterceptor, RoleMap
from blocktxn.server import guard, start_server
from blocktxn.tls import TlsFiles
from blocktxn.v1 import coordinator_pb2 as pb

from .audit import SERVICE, _own_id, allowed
from .registry import HEARTBEAT_S, AgentRegistry
from .store import Store

Ctx = grpc.aio.ServicerContext[Any, Any]


class HeartbeatServicer:
    """Only RegisterAgent, and only its heartbeats without inventory (every other
    method of the service is UNIMPLEMENTED here)."""

    def __init__(self, registry: AgentRegistry, store: Store) -> None:
        self.registry, self.store = registry, store

    async def RegisterAgent(self, request: pb.RegisterAgentRequest, context: Ctx
                            ) -> pb.RegisterAgentResponse:
        if request.HasField("inventory"):
            return pb.RegisterAgentResponse(heartbeat_s=HEARTBEAT_S, send_inventory=True)
        known = await guard(context, lambda: self.registry.quick_heartbeat(
            request.agent_id, request.address, request.inventory_digest, self.store))
        return pb.RegisterAgentResponse(heartbeat_s=HEARTBEAT_S, send_inventory=not known)

    def add_to(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "RegisterAgent": grpc.unary_unary_rpc_method_handler(
                self.RegisterAgent, request_deserializer=pb.RegisterAgentRequest.FromString,
                response_serializer=pb.RegisterAgentResponse.SerializeToString)}),))


def heartbeat_service(registry: AgentRegistry, listen: str, advertise_host: str,
                      tls: TlsFiles, roles: RoleMap,
                      on_address: Callable[[str], None]
                      ) -> Callable[[Store], Awaitable[Callable[[], Awaitable[None]]]]:
    """What the keeper starts on its loop: the heartbeat server on *listen* (port 0:
    any), its address (*advertise_host* and the port bound) given to *on_address*.

    Raises (when started): OSError, the address cannot be bound."""
    async def start(store: Store) -> Callable[[], Awaitable[None]]:
        agent_only = {"RegisterAgent": allowed()["RegisterAgent"]}
        server = await start_server(
            HeartbeatServicer(registry, store).add_to,
            SERVICE, listen, tls, None, [AccessInterceptor(SERVICE, agent_only, roles, _own_id)],
            on_port=lambda port: on_address(f"{advertise_host}:{port}"))

        async def stop() -> None:
            await server.stop(grace=1)
        return stop

    return start
