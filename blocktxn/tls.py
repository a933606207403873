"""TLS for every gRPC hop: servers and clients take the same three files.

With ``ca`` a server requires and checks client certificates (mutual TLS) and a
client checks the server's; without any file everything is plaintext (for one
machine or a trusted lab network only).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True)
class TlsFiles:
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @property
    def enabled(self) -> bool:
        return any((self.cert, self.key, self.ca))

    def check(self) -> None:
        """Raises: ValueError for an incomplete or unreadable set of files."""
        if not self.enabled:
            return
        if bool(self.cert) != bool(self.key):
            raise ValueError("--tls-cert and --tls-key go together")
        for f in (self.cert, self.key, self.ca):
            if f is not None and not Path(f).is_file():
                raise ValueError(f"TLS file {f} does not exist")

    @staticmethod
    def _read(f: Path | None) -> bytes | None:
        return Path(f).read_bytes() if f else None

    def server_credentials(self) -> grpc.ServerCredentials:
        if not (self.cert and self.key):
            raise ValueError("a TLS server needs --tls-cert and --tls-key")
        pair = [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())]
        return grpc.ssl_server_credentials(pair, root_certificates=self._read(self.ca),
                                           require_client_auth=self.ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self._read(self.ca),
                                            private_key=self._read(self.key),
                                            certificate_chain=self._read(self.cert))

    def channel(self, address: str, interceptors: Any = None) -> grpc.aio.Channel:
        """An asyncio channel to *address*, TLS when configured."""
        if self.enabled:
            return grpc.aio.secure_channel(address, self.channel_credentials(),
                                           interceptors=interceptors)
        return grpc.aio.insecure_channel(address, interceptors=interceptors)

    def add_port(self, server: grpc.aio.Server, listen: str) -> int:
        if self.enabled:
            return server.add_secure_port(listen, self.server_credentials())
        return server.add_insecure_port(listen)


def add_arguments(p: argparse.ArgumentParser, env: bool = False,
                  suppress: bool = False) -> None:
    """The three TLS options; *suppress*: absent ones leave the namespace alone (for a
    subcommand that repeats options its parent command takes)."""
    hint = " (default $BLOCKTXN_TLS_{})" if env else ""
    kw: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    p.add_argument("--tls-cert", type=Path, help="PEM certificate" + hint.format("CERT"), **kw)
    p.add_argument("--tls-key", type=Path, help="PEM private key" + hint.format("KEY"), **kw)
    p.add_argument("--tls-ca", type=Path, help="PEM CA bundle: verify peers, and on a "
                   "server require client certificates (mutual TLS)" + hint.format("CA"), **kw)


def check_listen(listen: str, files: TlsFiles, insecure: bool) -> None:
    """Plaintext only on loopback, unless *insecure* says so explicitly.

    Raises: ValueError."""
    if files.enabled or insecure:
        return
    host = listen.rpartition(":")[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"--listen {listen}: without TLS a daemon listens on loopback "
                         "only; give --tls-cert/--tls-key/--tls-ca, or --insecure for a "
                         "trusted network")


def add_insecure_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--insecure", action="store_true",
                   help="allow plaintext gRPC on an address other than loopback (a trusted "
                   "lab network only; otherwise give --tls-*)")


def from_args(args: argparse.Namespace, env: bool = False) -> TlsFiles:
    """Raises: ValueError (see TlsFiles.check)."""
    def pick(name: str) -> Path | None:
        value = getattr(args, f"tls_{name}", None)
        if value is None and env and os.environ.get(f"BLOCKTXN_TLS_{name.upper()}"):
            value = Path(os.environ[f"BLOCKTXN_TLS_{name.upper()}"])
        return Path(value) if value else None

    files = TlsFiles(pick("cert"), pick("key"), pick("ca"))
    files.check()
    return files
