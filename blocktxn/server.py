"""What every blocktxn gRPC server has: health checking, reflection, TLS, an explicit address."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from grpc_health.v1 import _async as health_aio  # public alias: health.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from blocktxn.tls import TlsFiles


async def start_server(register: Callable[[grpc.aio.Server], None], service: str,
                       listen: str, tls: TlsFiles | None) -> grpc.aio.Server:
    """Start a server for *service* (its full proto name) on *listen*.

    *register* adds the servicer; health (every service SERVING) and reflection
    are added here, so grpcurl and load balancers work against every daemon.

    Raises:
        OSError: the address cannot be bound.
    """
    server = grpc.aio.server()
    register(server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", service):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [service, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if (tls or TlsFiles()).add_port(server, listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    return server
