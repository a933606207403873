"""Prometheus metrics of both daemons: the ``--metrics-listen`` option and the HTTP
``/metrics`` endpoint. Off by default; each daemon keeps its metrics in a registry of its
own (never prometheus_client's global one), so two daemons in one process do not mix.

The endpoint is served from a thread. It follows the daemon's TLS: with
``--tls-cert``/``--tls-key`` it is HTTPS with the same certificate, and with ``--tls-ca``
too it asks every scraper for a client certificate from that CA (as the gRPC port does);
without them it is plain HTTP: bind it to loopback or to a management network.

What a daemon exports is in ``coordinator/metrics.py`` and ``agent/metrics.py``; names
and labels follow Prometheus' conventions (base units in the name, ``_total`` for
counters, label values from small fixed sets or from the daemon's own configured
disks)."""

from __future__ import annotations

import argparse
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.process_collector import ProcessCollector

from blocktxn import __version__
from blocktxn.errors import BlocktxnError
from blocktxn.tls import TlsFiles

log = logging.getLogger(__name__)

#: Buckets (seconds) of the duration histograms: a freeze of a few milliseconds up to a
#: transaction of an hour.
#: seconds a scrape's connection may stay silent (the TLS handshake included)
CONNECTION_TIMEOUT = 10.0

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0, 900.0, 3600.0)


class MetricsError(BlocktxnError):
    """The metrics endpoint cannot be served (a bad or busy address)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-listen", metavar="HOST:PORT",
                        help="serve Prometheus metrics at HOST:PORT/metrics (default: off): "
                        "HTTPS with the daemon's --tls-cert/--tls-key (and a client "
                        "certificate from --tls-ca when given), else plain HTTP (use "
                        "loopback or a management network)")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6), port 1..65535.

    Raises: ValueError with the option's name.
    """
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--metrics-listen {text!r} is not HOST:PORT (port 1..65535)")
    return host, int(port)


def new_registry(daemon: str) -> CollectorRegistry:
    """A daemon's own registry: the process' CPU, memory and descriptors, and
    ``blocktxn_build_info``."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    info = GaugeMetricFamily("blocktxn_build_info", "blocktxn's version and daemon kind",
                             labels=["version", "daemon"])
    info.add_metric([__version__, daemon], 1.0)

    class _Info:
        def collect(self) -> list[GaugeMetricFamily]:
            return [info]

    registry.register(_Info())
    return registry


def serve(listen: str | None, registry: CollectorRegistry,
          tls: TlsFiles | None = None) -> Callable[[], Awaitable[None]]:
    """Start serving *registry* at *listen* (None: nothing) and return the stop hook;
    over HTTPS when *tls* has a certificate (client certificates required when it has a
    CA). Call it before anything else starts: a busy address must stop the daemon at once.

    Raises:
        MetricsError: the address cannot be bound (in use, not local, bad name) or the
            certificate files cannot be loaded.
    """
    server: _Server | None = None
    thread: threading.Thread | None = None
    if listen is not None:
        host, port = parse_listen(listen)
        try:
            server = _Server.bind(host, port, registry, tls)
        except OSError as err:  # ssl.SSLError is one too
            raise MetricsError(f"--metrics-listen {listen}: {err.strerror or err}") from err
        thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        thread.start()
        log.info("metrics on %s://%s/metrics%s", "https" if server.tls else "http", listen,
                 " (client certificates required)" if tls and tls.ca and server.tls else "")

    async def stop() -> None:
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=2)

    return stop


class _Server(ThreadingWSGIServer):
    """The metrics HTTP(S) server: each connection is served on a thread of its own with
    a deadline, the TLS handshake included (prometheus_client's own server shakes hands
    inside ``accept``, on its one serving thread, without a timeout: one idle connection
    held every scrape up)."""

    tls: ssl.SSLContext | None = None

    @classmethod
    def bind(cls, host: str, port: int, registry: CollectorRegistry,
             tls: TlsFiles | None) -> _Server:
        """Raises: OSError (the address; ssl.SSLError: the certificate files)."""
        context = None
        if tls is not None and tls.cert is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                                 cafile=str(tls.ca) if tls.ca else None)
            context.load_cert_chain(str(tls.cert), str(tls.key))
            context.verify_mode = ssl.CERT_REQUIRED if tls.ca else ssl.CERT_NONE
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        # the socket is made in __init__ from the class' address family (IPv4 or IPv6)
        bound: type[_Server] = type("_Bound", (cls,), {"address_family": family,
                                                        "tls": context})
        server = bound((host, port), _QuietHandler)
        server.set_app(make_wsgi_app(registry))
        return server

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        sock.settimeout(CONNECTION_TIMEOUT)
        if self.tls is not None:  # the handshake happens at the first read, on its thread
            sock = self.tls.wrap_socket(sock, server_side=True,
                                        do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scraper that fails the handshake or goes silent: one debug line, no
        traceback on stderr."""
        log.debug("metrics: a request from %s failed", client_address, exc_info=True)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass
