"""The freeze watchdog's side of its protocol with the agent, for every backend.

A watchdog is a separate process per quiesced VM that ends the quiesce at its
deadline even if the agent dies (``blocktxn.agent.qemu.watchdog`` for bare QEMU,
``blocktxn.agent.libvirt.watchdog`` for libvirt). It writes ``ready`` on stdout once
it can act; its input is one command per line: ``arm DEADLINE`` (unix time) just
before a quiesce and ``disarm`` once the agent has ended the quiesce itself. Every
``arm`` is answered on stdout, ``armed DEADLINE`` once the timer is set: the agent
quiesces only after that answer (a wedged watchdog, or one whose pipe is open but
that reads nothing, is noticed before the freeze, not at the deadline). Every
``disarm`` is answered too, ``disarmed`` once the VM's claim (below) is let go, or
``ending`` if the deadline already passed and the watchdog is ending the quiesce
itself (it keeps the claim until that is over). End of
input means the agent is gone: an armed watchdog still ends the quiesce at its
deadline, then exits; an unarmed one exits at once. (The agent's side is
``watchdog_proc.py``.)

A watchdog that outlived its agent (SIGKILLed while a guest was frozen), or one still
ending a quiesce whose thaw failed, must not end a LATER freeze of the same VM early.
So a VM has at most one armed watchdog, across processes (``VmClaim``): an ``arm``
while another one of this VM is armed or still ending its quiesce is answered
``busy WHY`` and the agent does not freeze. A claim lasts from ``arm`` to ``disarm``
before the deadline, or to the end of the thaw attempts after it (to the end of the
whole retry window if an attempt timed out: the guest agent may still carry it out).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import sys
import time
from collections.abc import Awaitable, Callable

from qemu.qmp.error import QMPError

from .errors import AgentError

READY = "ready"
BUSY = "busy"
TRIES = 3
END_TIMEOUT = 5.0  # seconds one attempt to end the quiesce may take
RETRY_PAUSE = 0.5
#: From the deadline on, how long an armed watchdog may still be ending its quiesce
#: (every attempt timed out). No other freeze of the VM may start meanwhile.
ENDING_WINDOW = TRIES * (END_TIMEOUT + RETRY_PAUSE)


def arm_line(deadline: float) -> bytes:
    return f"arm {deadline!r}\n".encode()


def armed_line(deadline: float) -> str:
    """The watchdog's answer to ``arm_line(deadline)`` once it is armed."""
    return f"armed {deadline!r}"


DISARM = b"disarm\n"
DISARMED = "disarmed"
ENDING = "ending"

End = Callable[[], Awaitable[object]]


class VmClaim:
    """At most one armed watchdog per VM on this host, whichever process it is: an
    abstract unix socket named after the VM, bound while armed. The kernel lets go of
    it when the process exits, however it dies (no file to clean up, no pid to trust).
    Abstract names are per network namespace: an agent and its watchdogs share one."""

    def __init__(self, key: str) -> None:
        digest = hashlib.sha256(key.encode()).hexdigest()[:40]
        self.address = "\0blocktxn-freeze-watchdog-" + digest
        self._sock: socket.socket | None = None
        self._owner: object = None

    def take(self, owner: object) -> bool:
        """Claim the VM for *owner*; False if another process holds it."""
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(self.address)
            except OSError:
                sock.close()
                return False
            self._sock = sock
        self._owner = owner
        return True

    def release(self, owner: object) -> None:
        """Let go of the claim, if *owner* still holds it."""
        if self._owner is owner and self._sock is not None:
            self._sock.close()
            self._sock = self._owner = None


#: Why a freeze is refused while another process's watchdog holds the VM's claim.
HELD_ELSEWHERE = ("a freeze watchdog of this VM (an earlier agent process's, or one "
                  "still ending an earlier quiesce whose thaw failed) is armed or ending "
                  "it; wait for its end")


def held_elsewhere(key: str) -> bool:
    """Some watchdog process holds VM *key*'s claim now (armed, or ending a quiesce).
    A probe only: the claim is let go at once; the watchdog's ``arm`` still decides."""
    probe = VmClaim(key)
    if not probe.take(probe):
        return True
    probe.release(probe)
    return False


class _Armed:
    """One armed deadline: sleep until it, then end the quiesce (a few tries); the
    claim on the VM is given back when this is over (or disarmed before the deadline)."""

    def __init__(self, deadline: float, what: str, end: End, claim: VmClaim) -> None:
        self.deadline = deadline
        self.ending = False  # the deadline passed: thaw attempts may be in flight
        self.task = asyncio.create_task(self._run(what, end, claim))

    async def _run(self, what: str, end: End, claim: VmClaim) -> None:
        try:
            await asyncio.sleep(max(0.0, self.deadline - time.time()))
            self.ending = True
            gave_up_waiting = False
            for attempt in range(TRIES):
                try:
                    await asyncio.wait_for(end(), END_TIMEOUT)
                    logging.warning("freeze deadline passed: watchdog ended the quiesce "
                                    "of %s", what)
                    break
                except (AgentError, QMPError, OSError, TimeoutError) as err:
                    gave_up_waiting |= isinstance(err, TimeoutError)
                    logging.warning("watchdog: ending the quiesce of %s failed: %s",
                                    what, err)
                    if attempt + 1 < TRIES:
                        await asyncio.sleep(RETRY_PAUSE)
            if gave_up_waiting:  # that request may still be carried out, late
                await asyncio.sleep(max(0.0, self.deadline + ENDING_WINDOW - time.time()))
        finally:
            claim.release(self)

    @property
    def over(self) -> bool:
        return self.task.done()


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def serve(what: str, end: End, vm_key: str) -> None:
    """Say ready, then follow the agent's commands until the end of its input.
    *vm_key* names the VM for the claim (the same for every watchdog of one VM)."""
    loop = asyncio.get_running_loop()
    claim = VmClaim(vm_key)
    _say(READY)
    armed: _Armed | None = None
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        word, _, arg = line.strip().partition(" ")
        try:
            deadline = float(arg) if word == "arm" else None
        except ValueError:
            word = "?"
        if word not in ("arm", "disarm"):  # never disarms by mistake
            logging.error("watchdog: unknown command %r ignored", line.strip())
            continue
        if armed is not None and armed.over:
            armed = None
        if deadline is None:  # disarm
            if armed is not None and not armed.ending:
                armed.task.cancel()  # only sleeping: nothing is in flight
                claim.release(armed)
                armed = None
            _say(DISARMED if armed is None else ENDING)  # after the release
            continue
        if armed is not None:
            state = "ending it" if armed.ending else "armed"
            _say(f"{BUSY} its freeze watchdog is still {state} for an earlier quiesce "
                 f"(deadline {armed.deadline:.3f}); wait for its end")
        else:
            candidate = _Armed(deadline, what, end, claim)
            if claim.take(candidate):
                armed = candidate
                _say(armed_line(deadline))
            else:
                candidate.task.cancel()
                _say(f"{BUSY} {HELD_ELSEWHERE}")
    if armed is not None:  # the agent is gone: the armed deadline still holds
        with contextlib.suppress(asyncio.CancelledError):
            await armed.task
