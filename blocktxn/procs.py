"""Stopping child processes we started, by their Popen handle (never by name)."""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def kill(proc: subprocess.Popen[Any] | None) -> None:
    """SIGKILL (after SIGCONT, in case it was stopped) and reap."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)


def terminate(proc: subprocess.Popen[Any] | None, timeout: float = 10) -> None:
    """SIGTERM, wait up to *timeout*, then SIGKILL."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill(proc)
