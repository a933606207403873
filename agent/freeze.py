"""Freeze ownership and deadlines: which transaction holds each VM quiesced, the
thaw, and the agent's own auto-thaw at the freeze deadline.

A freeze is VM-wide, so one transaction at a time owns it. Bounded freeze does not
depend on this file alone: the backend's ``freeze`` also arms something outside the
agent (QEMU: the watchdog process) that thaws at the deadline if the agent cannot.

That watchdog may outlive what this file knows: after a failed thaw it keeps trying
until ``watchdog.ENDING_WINDOW`` past the deadline, so the VM stays owned until then;
and one armed by an earlier agent process (SIGKILLed while a guest was frozen) is
unknown here. Neither can end a later freeze early: a VM has one armed watchdog at a
time (``watchdog.VmClaim``), and a freeze waits for its ``armed`` answer, so a new
freeze of that VM is refused ("busy") until the old one is over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from .aio import gather_all
from .backend import VmBackend
from .errors import AgentError, FreezeRefusedError
from .watchdog import ENDING_WINDOW

log = logging.getLogger(__name__)

#: Seconds a stopping agent waits for freezes in flight (a watchdog's arm and the
#: guest's freeze, each bounded) before it thaws what it holds.
FREEZES_IN_FLIGHT_LIMIT = 15.0


class FreezeControl:
    """Quiesce of every VM of one agent, by transaction."""

    def __init__(self, backends: Mapping[str, VmBackend],
                 on_deadline: Callable[[str], Awaitable[None]]) -> None:
        self.backends = backends
        self.owner: dict[str, str] = {}  # vm -> txn id that froze it
        self.deadline: dict[str, float] = {}  # vm -> its freeze deadline
        self.since: dict[str, float] = {}  # vm -> when it was quiesced (monotonic)
        self.quiesce: dict[str, str] = {}  # vm -> how (freeze or pause)
        self._stopping = False
        self._in_flight = 0  # freezes under way in a backend
        self._none_in_flight = asyncio.Event()
        self._none_in_flight.set()
        self._on_deadline = on_deadline
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._releases: dict[str, asyncio.TimerHandle] = {}

    def frozen_by(self) -> dict[str, str]:
        """vm -> the transaction that holds it quiesced."""
        return dict(self.owner)

    async def prepare(self, vms: Sequence[str], quiesce: str) -> None:
        """Before the freeze window (see VmBackend.freeze_prepare)."""
        await gather_all(*(self.backends[vm].freeze_prepare(quiesce) for vm in vms))

    async def ready(self, vms: Sequence[str]) -> None:
        """Before the freeze window (see VmBackend.freeze_ready)."""
        await gather_all(*(self.backends[vm].freeze_ready() for vm in vms))

    async def freeze(self, txn_id: str, vm: str, quiesce: str, deadline: float) -> None:
        """Quiesce *vm* for *txn_id* until at most *deadline* (unix time)."""
        if quiesce == "none":
            return
        if self._stopping:
            raise FreezeRefusedError(f"VM {vm}: the agent is stopping; not freezing")
        self.owner[vm] = txn_id
        self.deadline[vm] = deadline
        self.quiesce[vm] = quiesce
        self.since[vm] = time.monotonic()
        self._in_flight += 1
        self._none_in_flight.clear()
        try:
            await self.backends[vm].freeze(quiesce, deadline)
        except FreezeRefusedError:  # nothing reached the guest: not ours to thaw
            for held in (self.owner, self.deadline, self.quiesce, self.since):
                held.pop(vm, None)
            raise
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._none_in_flight.set()
        log.info("txn %s: vm %s quiesced (%s) until at most %.1fs from now", txn_id, vm,
                 quiesce, deadline - time.time())

    async def thaw(self, txn_id: str, vms: Sequence[str], quiesce: str,
                   after_restart: bool = False) -> list[str]:
        """Thaw the VMs *txn_id* froze; release what was prepared for a freeze that
        never came. Return what failed: a VM whose thaw failed stays owned by *txn_id*
        until the safety net armed by the freeze has thawed it (its deadline, plus its
        retries: no other freeze of the VM may start while it may still thaw).

        *after_restart*: this process does not know whether it froze them (the journal
        says it may have): thaw every one no other transaction holds."""
        if after_restart and quiesce != "none":
            for vm in vms:
                self.owner.setdefault(vm, txn_id)

        async def one(vm: str) -> str:
            backend = self.backends[vm]
            if self.owner.get(vm) != txn_id:
                if vm not in self.owner:
                    await backend.freeze_abandon()
                return ""
            try:
                await backend.thaw(quiesce)
            except AgentError as err:
                log.error("vm %s: thaw failed, left to the deadline's thaw: %s", vm, err)
                self._release_at_deadline(txn_id, vm)
                return f"{vm}: thaw failed ({err}); the watchdog thaws it at the deadline"
            self.owner.pop(vm, None)
            held = time.monotonic() - self.since.pop(vm, time.monotonic())
            log.info("txn %s: vm %s thawed after %.0f ms", txn_id, vm, held * 1000)
            return ""

        return [p for p in await asyncio.gather(*(one(vm) for vm in vms)) if p]

    def _release_at_deadline(self, txn_id: str, vm: str) -> None:
        def release() -> None:
            self._releases.pop(vm, None)
            if self.owner.get(vm) == txn_id:
                del self.owner[vm]

        delay = max(0.0, self.deadline.get(vm, 0.0) - time.time()) + ENDING_WINDOW + 1.0
        self._releases[vm] = asyncio.get_running_loop().call_later(delay, release)

    # ---------------------------------------------------------- auto-thaw
    def arm(self, txn_id: str, deadline: float) -> None:
        """At *deadline*, call back (the runner thaws and records DeadlinePassed)."""
        async def fire() -> None:
            await asyncio.sleep(max(0.0, deadline - time.time()))
            log.warning("txn %s: freeze deadline passed, thawing on our own", txn_id)
            self._timers.pop(txn_id, None)
            await self._on_deadline(txn_id)

        self.disarm(txn_id)
        self._timers[txn_id] = asyncio.create_task(fire(), name=f"auto-thaw-{txn_id}")

    def disarm(self, txn_id: str) -> None:
        task = self._timers.pop(txn_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def stop(self) -> None:
        """The agent is stopping: no more timers, no new freeze, and every guest it
        holds quiesced is thawed now (a failed thaw is left to the deadline's safety
        net). A freeze in flight is waited for first: thawed (and its watchdog disarmed)
        before it had frozen, its guest would then freeze with nothing left to end it."""
        self._stopping = True
        try:
            await asyncio.wait_for(self._none_in_flight.wait(), FREEZES_IN_FLIGHT_LIMIT)
        except TimeoutError:
            log.error("stopping: a freeze still under way after %gs; its watchdog ends it "
                      "at its deadline", FREEZES_IN_FLIGHT_LIMIT)
        for task in self._timers.values():
            task.cancel()
        self._timers.clear()
        held: dict[tuple[str, str], list[str]] = {}
        for vm, txn_id in self.owner.items():
            held.setdefault((txn_id, self.quiesce.get(vm, "freeze")), []).append(vm)
        for (txn_id, quiesce), vms in held.items():
            log.warning("txn %s: stopping: thawing %s", txn_id, ", ".join(vms))
            await self.thaw(txn_id, vms, quiesce)
        for handle in self._releases.values():
            handle.cancel()
