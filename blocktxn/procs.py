"""Child processes we start: they die with their caller, and we stop them by their
Popen handle (never by name)."""

from __future__ import annotations

import signal
import subprocess
from typing import Any

#: Put before a child's argv so that the kernel SIGKILLs it when its caller dies, even
#: by SIGKILL (no ``finally`` runs then): util-linux's ``setpriv`` sets the parent-death
#: signal and execs the command (no ``preexec_fn``, which is unsafe in a threaded
#: process). The kernel tracks the *thread* that forked: start such a child from a
#: thread that lives as long as the caller (the main thread, or the event loop's).
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--"]


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
