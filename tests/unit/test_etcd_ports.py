"""The private etcd's client and peer ports are two different free ports: the kernel
may hand out a port again as soon as the socket that held it is closed (a CI run had
etcd given one port for both, and it could not start: "address already in use")."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from blocktxn.coordinator import etcd_server


class _Kernel:
    """Hands out the lowest port no open socket holds (as a kernel may)."""

    def __init__(self) -> None:
        self.held: set[int] = set()

    def socket(self, *_: Any) -> Any:
        kernel = self

        class Sock:
            port = 0

            def bind(self, _: Any) -> None:
                self.port = min(p for p in range(40000, 40010) if p not in kernel.held)
                kernel.held.add(self.port)

            def getsockname(self) -> tuple[str, int]:
                return "127.0.0.1", self.port

            def close(self) -> None:
                kernel.held.discard(self.port)

            def __enter__(self) -> Sock:
                return self

            def __exit__(self, *_: Any) -> None:
                self.close()

        return Sock()


def test_client_and_peer_ports_differ_even_when_a_closed_port_comes_back(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(socket, "socket", _Kernel().socket)
    server = etcd_server.EtcdServer(tmp_path)
    assert server.client_port != server.peer_port
    assert etcd_server.EtcdServer(tmp_path, client_port=40000).peer_port != 40000
