"""A minimal client for a real qemu-guest-agent on a QEMU chardev socket."""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from pathlib import Path
from typing import Any


class GuestAgentError(RuntimeError):
    """The guest agent answered a command with an error."""


class GuestAgent:
    """JSON lines to and from qemu-ga over the host end of its virtio-serial port.

    The channel has no session: a reply to something sent before we connected (or to
    an earlier, timed-out sync) may still arrive. :meth:`sync` therefore sends
    ``guest-sync-delimited`` with a fresh id after a 0xFF byte (which resets qemu-ga's
    parser), discards everything up to qemu-ga's own 0xFF, and waits for its id.
    """

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._buf = b""

    def close(self) -> None:
        """Close the connection (qemu-ga keeps running)."""
        self.sock.close()

    def _send(self, msg: dict[str, Any], delimit: bool = False) -> None:
        self.sock.sendall((b"\xff" if delimit else b"") + json.dumps(msg).encode() + b"\n")

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no reply from the guest agent on {self.path}")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError(f"no reply from the guest agent on {self.path}") from None
        if not chunk:
            raise ConnectionError("guest agent socket closed")
        self._buf += chunk

    def _read_message(self, deadline: float) -> dict[str, Any]:
        """The next JSON object line (non-JSON noise, e.g. 0xFF delimiters, skipped)."""
        while True:
            while b"\n" not in self._buf:
                self._fill(deadline)
            line, self._buf = self._buf.split(b"\n", 1)
            line = line.replace(b"\xff", b"").strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                return msg

    def sync(self, timeout: float = 60.0, attempt: float = 2.0) -> None:
        """Synchronise with qemu-ga (retrying while it is not up yet)."""
        deadline = time.monotonic() + timeout
        while True:
            ident = random.randrange(1, 2**31)
            self._send({"execute": "guest-sync-delimited", "arguments": {"id": ident}},
                       delimit=True)
            try:
                end = min(deadline, time.monotonic() + attempt)
                while True:
                    if b"\xff" not in self._buf:
                        self._buf = b""
                        self._fill(end)
                        continue
                    self._buf = self._buf.split(b"\xff", 1)[1]
                    if self._read_message(end).get("return") == ident:
                        return
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise

    def execute(self, cmd: str, args: dict[str, Any] | None = None,
                timeout: float = 30.0) -> Any:
        """Run one command; its ``return`` value (:class:`GuestAgentError` on error)."""
        self._send({"execute": cmd, **({"arguments": args} if args else {})})
        msg = self._read_message(time.monotonic() + timeout)
        if "error" in msg:
            raise GuestAgentError(f"{cmd}: {msg['error']}")
        if "return" not in msg:
            raise GuestAgentError(f"{cmd}: unexpected reply {msg}")
        return msg["return"]

    def read_file(self, path: str) -> bytes:
        """The content of a guest file, read through guest-file-open/read/close."""
        handle = self.execute("guest-file-open", {"path": path, "mode": "r"})
        chunks: list[bytes] = []
        try:
            while True:
                r = self.execute("guest-file-read", {"handle": handle, "count": 1 << 20})
                chunks.append(base64.b64decode(r["buf-b64"]))
                if r["eof"] or not r["count"]:
                    break
        finally:
            self.execute("guest-file-close", {"handle": handle})
        return b"".join(chunks)


def call_once(path: Path, cmd: str, args: dict[str, Any] | None = None,
              timeout: float = 60.0) -> Any:
    """Run one command on a connection of its own, closed before returning (the socket
    serves one client at a time; a blocktxn agent opens its own for each freeze/thaw)."""
    ga = GuestAgent(path, timeout)
    try:
        ga.sync(timeout)
        return ga.execute(cmd, args, timeout)
    finally:
        ga.close()
