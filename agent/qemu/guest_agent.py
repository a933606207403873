"""Client of the qemu-ga protocol on a guest-agent socket: fsfreeze only.

A fresh connection per call, resynchronised with ``guest-sync`` first (the
channel may hold a stale reply of an earlier, timed-out call).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from typing import Any

from ..errors import AgentTimeoutError, QemuError


class GuestAgentClient:
    """Freeze/thaw through one guest agent socket."""

    def __init__(self, socket_path: str, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    async def call(self, cmd: str, timeout: float | None = None) -> Any:
        """Run one guest-agent command; return its ``return`` value.

        Raises:
            QemuError: unreachable socket or an error reply.
            AgentTimeoutError: no answer within the deadline.
        """
        try:
            return await asyncio.wait_for(self._call(cmd), timeout or self.timeout)
        except TimeoutError as err:
            raise AgentTimeoutError(f"guest agent: {cmd}: no answer") from err
        except (OSError, ValueError) as err:
            raise QemuError(f"guest agent: {cmd}: {err}") from err

    async def _call(self, cmd: str) -> Any:
        reader, writer = await asyncio.open_unix_connection(self.socket_path)
        try:
            sync_id = random.randrange(1, 2**31)
            await self._send(writer, {"execute": "guest-sync", "arguments": {"id": sync_id}})
            while (await self._recv(reader)).get("return") != sync_id:
                pass
            await self._send(writer, {"execute": cmd})
            reply = await self._recv(reader)
            if "error" in reply:
                raise QemuError(f"guest agent: {cmd}: {reply['error'].get('desc', reply)}")
            return reply.get("return")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        writer.write(json.dumps(msg).encode() + b"\n")
        await writer.drain()

    @staticmethod
    async def _recv(reader: asyncio.StreamReader) -> dict[str, Any]:
        line = await reader.readline()
        if not line:
            raise OSError("guest agent closed the connection")
        msg: dict[str, Any] = json.loads(line.lstrip(b"\xff"))
        return msg

    async def freeze(self, timeout: float | None = None) -> None:
        await self.call("guest-fsfreeze-freeze", timeout)

    async def thaw(self) -> None:
        await self.call("guest-fsfreeze-thaw")

    async def status(self) -> str:
        return str(await self.call("guest-fsfreeze-status"))
