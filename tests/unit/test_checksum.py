"""The image checksum: the same digest as coreutils' sha256sum, read in a worker thread
that stops soon after its caller gives up (an image has no size limit)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

from blocktxn.agent.checksums import file_sha256


def test_the_checksum_is_sha256sums(tmp_path: Path) -> None:
    f = tmp_path / "img"
    f.write_bytes(os.urandom(3 << 20) + b"tail")
    want = subprocess.run(["sha256sum", str(f)], capture_output=True, text=True,
                          check=True).stdout.split()[0]
    assert asyncio.run(file_sha256(f)) == want


def test_a_cancelled_checksum_stops_its_thread(tmp_path: Path) -> None:
    f = tmp_path / "big"
    with open(f, "wb") as out:
        out.truncate(1 << 40)  # 1 TiB, sparse: many minutes of reading

    async def run() -> None:
        task = asyncio.create_task(file_sha256(f))
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.wait({task})
        # the worker thread ends (a thread still hashing would hold this for minutes)
        await asyncio.wait_for(asyncio.get_running_loop().shutdown_default_executor(), 30)

    asyncio.run(run())
