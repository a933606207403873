"""What the soak measures from outside the daemons: process memory and descriptors
(``/proc``), repository bytes on disk, and etcd's size and keys (read directly)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from aetcd import rpc as etcd_rpc
from aetcd.utils import prefix_range_end

from blocktxn.coordinator.store import Store

ROOT = b"/blocktxn/"  # every key blocktxn writes
KINDS = ("txn", "member", "decision", "request", "set", "image", "agent", "live", "prune",
         "leader")


def rss_kib(pid: int | None) -> int:
    """VmRSS of *pid* in KiB (0: no such process)."""
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def fds(pid: int | None) -> int:
    """Open file descriptors of *pid* (0: no such process)."""
    if pid is None:
        return 0
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def du_bytes(root: Path) -> int:
    """Bytes allocated on disk under *root* (what ``du`` counts)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in [".", *files]:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass  # removed meanwhile
    return total


@dataclass(frozen=True)
class EtcdFacts:
    db_bytes: int          # the database file (grows in pages; shrinks only on defrag)
    db_in_use_bytes: int   # of which in use (compaction frees the rest for reuse)
    revision: int
    keys: int              # every key under /blocktxn/
    by_kind: dict[str, int]  # keys per kind (/blocktxn/v1/KIND/...), "other" for the rest


def etcd_facts(endpoint: str) -> EtcdFacts:
    async def ask() -> EtcdFacts:
        store = Store(endpoint, timeout=10)
        try:
            await store.client.connect()
            status = await store.client.maintenancestub.Status(
                etcd_rpc.StatusRequest(), timeout=10, metadata=store.client.metadata)
            reply = await store.client.kvstub.Range(
                etcd_rpc.RangeRequest(key=ROOT, range_end=prefix_range_end(ROOT),
                                      keys_only=True),
                timeout=10, metadata=store.client.metadata)
        finally:
            await store.close()
        kinds: Counter[str] = Counter()
        for kv in reply.kvs:
            parts = bytes(kv.key).decode(errors="replace").split("/")
            kind = parts[3] if len(parts) > 3 else ""
            kinds[kind if kind in KINDS else "other"] += 1
        return EtcdFacts(int(status.dbSize), int(status.dbSizeInUse),
                         int(status.header.revision), len(reply.kvs),
                         {k: kinds.get(k, 0) for k in (*KINDS, "other")})

    return asyncio.run(ask())
