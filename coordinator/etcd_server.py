"""A private single-member etcd (Debian etcd-server), supervised by the coordinator
or by tests: one machine needs no set-up.

It compacts its own history (``COMPACTION``): without that, etcd keeps every
revision of every key until its space quota (2 GiB) is used up and it refuses writes.
One hour of history is what blocktxn needs: it reads only the current values (a
listing pins one revision for a few milliseconds), so the hour is a margin for
operators (``etcdctl get --rev``); etcd 3.4 compacts such a window once an hour.
Compaction frees space inside the database for reuse; the file only shrinks on a
defragmentation (see deploy/CONFIGURATION.md, "etcd upkeep"). Its memory holds the
raft log since the last snapshot: ``SNAPSHOT`` bounds it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from blocktxn import procs


def _free_ports(n: int, taken: tuple[int, ...] = ()) -> list[int]:
    """*n* different free loopback ports, none in *taken*: the sockets are held open
    together while they are chosen (a port is handed out again once its socket closes)."""
    held: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < n:
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            if port not in taken:
                ports.append(port)
        return ports
    finally:
        for s in held:
            s.close()


#: etcd's own history compaction: keep one hour of revisions (etcd 3.4 flags)
COMPACTION = ("--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1h")
#: etcd keeps its raft log in memory until a snapshot every --snapshot-count entries
#: (3.4's default 100,000: ~10,000 transactions, tens of MiB); 10,000 bounds it lower
SNAPSHOT = ("--snapshot-count", "10000")


class EtcdServer:
    """``etcd`` on loopback with its data under *data_dir*; *quota* (bytes of database,
    0: etcd's default of 2 GiB) raises etcd's NOSPACE alarm early, *max_request* (bytes,
    0: etcd's default of 1.5 MiB) refuses smaller requests (tests, benchmarks)."""

    def __init__(self, data_dir: Path, client_port: int = 0, peer_port: int = 0,
                 name: str = "blocktxn", quota: int = 0, max_request: int = 0) -> None:
        self.data_dir = data_dir
        free = iter(_free_ports(2, (client_port, peer_port)))
        self.client_port = client_port or next(free)
        self.peer_port = peer_port or next(free)
        self.name = name
        self.quota = quota
        self.max_request = max_request
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 20.0) -> None:
        """Launch etcd and wait until it listens.

        Raises: FileNotFoundError (no etcd binary), RuntimeError, TimeoutError."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start etcd; it is killed when the calling thread's process dies (call it from
        a long-lived thread: see :data:`procs.DIE_WITH_PARENT`).

        Raises: FileNotFoundError (no etcd binary)."""
        binary = shutil.which("etcd")
        if binary is None:
            raise FileNotFoundError("etcd not found: apt-get install etcd-server")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            [*procs.DIE_WITH_PARENT, binary, "--name", self.name,
             "--data-dir", str(self.data_dir / "etcd"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"{self.name}={peer}", "--logger", "zap",
             "--log-outputs", str(self.data_dir / "etcd.log"), *COMPACTION, *SNAPSHOT,
             *(["--quota-backend-bytes", str(self.quota)] if self.quota else []),
             *(["--max-request-bytes", str(self.max_request)] if self.max_request else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Raises: RuntimeError (etcd exited), TimeoutError."""
        assert self.proc is not None, "launch() first"
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
