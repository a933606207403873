"""A private single-member etcd (Debian etcd-server), supervised by the coordinator
or by tests: one machine needs no set-up."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from blocktxn import procs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """``etcd`` on loopback with its data under *data_dir*."""

    def __init__(self, data_dir: Path, client_port: int = 0, peer_port: int = 0,
                 name: str = "blocktxn") -> None:
        self.data_dir = data_dir
        self.client_port = client_port or _free_port()
        self.peer_port = peer_port or _free_port()
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 20.0) -> None:
        """Raises: FileNotFoundError (no etcd binary), TimeoutError."""
        binary = shutil.which("etcd")
        if binary is None:
            raise FileNotFoundError("etcd not found: apt-get install etcd-server")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            [binary, "--name", self.name, "--data-dir", str(self.data_dir / "etcd"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"{self.name}={peer}", "--logger", "zap",
             "--log-outputs", str(self.data_dir / "etcd.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see "
                                   f"{self.data_dir / 'etcd.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.client_port), 0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("etcd did not start")

    def kill(self) -> None:
        procs.kill(self.proc)

    def stop(self) -> None:
        procs.terminate(self.proc)
