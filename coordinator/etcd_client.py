"""The coordinator's etcd connection: plaintext, or TLS (the cluster's CA, optionally a
client certificate for etcd's ``--client-cert-auth``), with or without etcd's user
authentication. aetcd opens plaintext channels only; this client opens the channel
itself and keeps aetcd's stubs and calls. An expired or revoked auth token makes the
next request authenticate again."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import grpc
from aetcd import rpc as etcd_rpc


@dataclass(frozen=True)
class EtcdAccess:
    """How to reach etcd: TLS files and credentials (all optional)."""

    ca: Path | None = None          # verify etcd's certificate with this CA (enables TLS)
    cert: Path | None = None        # client certificate (etcd --client-cert-auth)
    key: Path | None = None
    user: str = ""                  # etcd user (auth enabled): with password_file
    password_file: Path | None = None

    @property
    def tls(self) -> bool:
        return self.ca is not None

    def check(self) -> None:
        """Raises: ValueError for an incomplete or unreadable set."""
        if bool(self.cert) != bool(self.key):
            raise ValueError("--etcd-cert and --etcd-key go together")
        if (self.cert or self.key) and not self.ca:
            raise ValueError("--etcd-cert needs --etcd-ca (TLS)")
        if bool(self.user) != bool(self.password_file):
            raise ValueError("--etcd-user and --etcd-password-file go together")
        for f in (self.ca, self.cert, self.key, self.password_file):
            if f is not None and not Path(f).is_file():
                raise ValueError(f"etcd access file {f} does not exist")
        if self.password_file is not None and not self.password():
            raise ValueError(f"--etcd-password-file {self.password_file} is empty")

    def password(self) -> str:
        if self.password_file is None:
            return ""
        return Path(self.password_file).read_text().strip()

    def credentials(self) -> grpc.ChannelCredentials:
        def read(f: Path | None) -> bytes | None:
            return Path(f).read_bytes() if f is not None else None

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


class EtcdClient(aetcd.Client):  # type: ignore[misc]  # aetcd ships no types
    """aetcd's client over a channel this class opens (TLS when configured)."""

    def __init__(self, host: str, port: int, access: EtcdAccess, timeout: int,
                 options: dict[str, object]) -> None:
        super().__init__(host=host, port=port, username=access.user or None,
                         password=access.password() or None, timeout=timeout,
                         options=options)
        self.access = access
        self._lock = asyncio.Lock()
        self._ready = False

    async def connect(self) -> None:
        """Open the channel (and authenticate) unless open already.

        Raises: grpc.RpcError, OSError, TimeoutError."""
        if self._ready:
            return
        async with self._lock:
            if self._ready:
                return
            target = f"{self._host}:{self._port}"
            options = list(self._options.items())
            channel = grpc.aio.secure_channel(target, self.access.credentials(), options) \
                if self.access.tls else grpc.aio.insecure_channel(target, options)
            metadata = None
            if self._username:
                try:
                    reply = await etcd_rpc.AuthStub(channel).Authenticate(
                        etcd_rpc.AuthenticateRequest(name=self._username,
                                                     password=self._password),
                        timeout=self._timeout)
                except BaseException:
                    await channel.close(None)
                    raise
                metadata = (("token", reply.token),)
            self.channel, self.metadata = channel, metadata
            self.kvstub = etcd_rpc.KVStub(channel)
            self.clusterstub = etcd_rpc.ClusterStub(channel)
            self.leasestub = etcd_rpc.LeaseStub(channel)
            self.maintenancestub = etcd_rpc.MaintenanceStub(channel)
            self._connected.set()
            self._ready = True

    async def refresh_lease(self, lease_id: int) -> Any:
        """One keepalive: open the LeaseKeepAlive stream, read its reply, cancel it
        (aetcd leaves it open, and grpc's request-consuming task then dies pending).

        Raises: grpc.RpcError, OSError."""
        await self.connect()
        call = self.leasestub.LeaseKeepAlive(
            iter([etcd_rpc.LeaseKeepAliveRequest(ID=lease_id)]), timeout=self._timeout,
            metadata=self.metadata)
        try:
            async for reply in call:
                return reply
            return None
        finally:
            call.cancel()

    async def keepalive_stream(self) -> Any:
        """A LeaseKeepAlive stream held open (``write`` a request per keepalive, ``read``
        the replies in order; the caller cancels it). No overall deadline: the caller
        gives each reply one.

        Raises: grpc.RpcError, OSError."""
        await self.connect()
        return self.leasestub.LeaseKeepAlive(metadata=self.metadata)

    async def reauthenticate(self, failed: Any) -> None:
        """The token of channel *failed* expired: the next request opens a fresh channel
        and logs in (unless a concurrent failure did so already)."""
        async with self._lock:
            if failed is None or failed is not self.channel:
                return
            self._ready = False
            self._connected.clear()
            await failed.close(None)

    async def close(self) -> None:
        self._ready = False
        if self.channel is not None:
            await self.channel.close(None)
