"""The agent's QEMU tools (qemu-img) run as its children: a SIGKILLed agent must not
leave one running, e.g. a rebase that the restarted agent would redo beside it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import asyncio
from blocktxn.agent.repository import run_tool
print("ready", flush=True)
asyncio.run(run_tool(*ARGV))
"""


def _pids_naming(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        # the tool itself, once exec'd (before that the match is setpriv, which may
        # not have set its parent-death signal yet)
        if marker.encode() in cmdline and b"ARGV" not in cmdline \
                and cmdline.split(b"\0", 1)[0] == sys.executable.encode():
            found.append(int(proc.name))
    return found


def test_a_tool_dies_with_the_killed_agent(tmp_path: Path) -> None:
    marker = f"blocktxn-test-{os.getpid()}-{time.monotonic_ns()}"
    # one process (a shell would leave its sleep behind), named by the marker
    argv = [sys.executable, "-c", "import time; time.sleep(300)", marker]
    code = f"ARGV = {argv!r}" + CHILD
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        while not _pids_naming(marker):
            assert time.monotonic() < deadline, "the tool did not start"
            time.sleep(0.05)
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while _pids_naming(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = _pids_naming(marker)
    finally:
        for pid in _pids_naming(marker):
            os.kill(pid, signal.SIGKILL)
    assert left == []
