"""The agent's link to the coordinator replicas (``--coordinator H:P[,H:P...]``): one
channel each, shared by the heartbeat and the in-doubt resolver; a caller whose call
failed moves on to the next replica."""

from __future__ import annotations

from typing import Any

from blocktxn.tls import TlsFiles
from blocktxn.v1 import coordinator_pb2_grpc as cpb_grpc


class Replicas:
    """Round-robin over the coordinator replicas."""

    def __init__(self, addresses: str, tls: TlsFiles) -> None:
        self.addresses = [a.strip() for a in addresses.split(",") if a.strip()]
        self._channels = [tls.channel(a) for a in self.addresses]
        self._turn = 0

    @property
    def current(self) -> str:
        return self.addresses[self._turn % len(self.addresses)]

    def stub(self) -> Any:  # the generated stub is typed for sync channels; this is aio
        """The current replica's CoordinatorService stub."""
        return cpb_grpc.CoordinatorServiceStub(self._channels[self._turn % len(self._channels)])

    def failed(self) -> None:
        """The current replica did not answer: use the next one."""
        self._turn += 1

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)
