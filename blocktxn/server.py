"""What every blocktxn gRPC server has: health checking, reflection, TLS, an explicit
address, and one guard that turns the components' errors into gRPC statuses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import _async as health_aio  # public alias: health.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from blocktxn.errors import BlocktxnError, Unavailable, status_code
from blocktxn.tls import TlsFiles

T = TypeVar("T")
Ctx = grpc.aio.ServicerContext[Any, Any]


async def abort_with(context: Ctx, err: BlocktxnError) -> None:
    """End the call with *err*'s status code and the first line of its message.

    Raises:
        grpc's abort exception (always).
    """
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    await context.abort(status_code(err), text)


async def guard(context: Ctx, call: Callable[[], Awaitable[T]]) -> T:
    """Run one handler step; a blocktxn error ends the call with its status."""
    try:
        return await call()
    except BlocktxnError as err:
        await abort_with(context, err)
        raise  # unreachable: abort raises


class ListenError(Unavailable, OSError):
    """A daemon cannot bind its address."""


async def start_server(register: Callable[[grpc.aio.Server], None], service: str,
                       listen: str, tls: TlsFiles | None,
                       health_servicer: Any = None,
                       interceptors: Sequence[Any] = (),
                       on_port: Callable[[int], None] | None = None) -> grpc.aio.Server:
    """Start a server for *service* (its full proto name) on *listen*.

    *register* adds the servicer; health (every service SERVING) and reflection
    are added here, so grpcurl and load balancers work against every daemon
    (*health_servicer*: a ``health.aio.HealthServicer`` the daemon updates later);
    *on_port* is told the port bound (*listen* may say port 0).

    Raises:
        ListenError (an OSError): the address cannot be bound.
    """
    # no SO_REUSEPORT (gRPC's default): a second daemon on the same port must fail,
    # not share the port's connections with the first
    server = grpc.aio.server(interceptors=list(interceptors),
                             options=[("grpc.so_reuseport", 0)])
    register(server)
    if health_servicer is None:
        health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", service):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [service, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        port = (tls or TlsFiles()).add_port(server, listen)
    except RuntimeError:  # how grpc reports a failed bind
        port = 0
    if port == 0:
        raise ListenError(f"cannot listen on {listen}: the address is in use or not "
                          "this host's")
    if on_port is not None:
        on_port(port)
    await server.start()
    return server
