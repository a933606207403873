"""A freeze watchdog acknowledges every arm before the agent freezes; one that does not
(wedged: SIGSTOPped, its pipe still open) is killed and the arm fails. A VM has one
armed watchdog at a time, whichever process it is: another one's arm is refused until
the first is disarmed or gone. Real watchdog processes; no guest is involved (nothing
reaches the deadline)."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from pathlib import Path

import pytest

from blocktxn.agent.errors import FreezeRefusedError, QemuError
from blocktxn.agent.watchdog import held_elsewhere
from blocktxn.agent.watchdog_proc import ARM_ACK_TIMEOUT, WatchdogHandle, alive

MODULE = "blocktxn.agent.qemu.watchdog"


async def started(tmp_path: Path, name: str = "vm-a", key: str = "") -> WatchdogHandle:
    handle = WatchdogHandle(name)
    key = key or str(tmp_path / name)
    await handle.prepare(MODULE, ["--ga", str(tmp_path / f"{name}-ga.sock"), "--vm-key", key],
                         key)
    await handle.ready()
    return handle


async def retired(handle: WatchdogHandle) -> None:
    """Stop *handle*'s watchdog and wait until it is reaped."""
    handle.stop()
    await asyncio.wait_for(asyncio.gather(*handle._reaping), 10)


def test_arm_is_acknowledged_and_cheap(tmp_path: Path) -> None:
    async def run() -> list[float]:
        handle = await started(tmp_path)
        took = []
        try:
            for _ in range(50):
                t0 = time.perf_counter()
                await handle.arm(time.time() + 60)
                took.append(time.perf_counter() - t0)
                assert handle.armed
                await handle.disarm()
        finally:
            await retired(handle)  # its input ends: the disarmed watchdog exits
        return took

    took = asyncio.run(run())
    median = statistics.median(took)
    print(f"arm+ack over {len(took)} arms: median {median * 1e3:.3f} ms, "
          f"max {max(took) * 1e3:.3f} ms")


def test_a_wedged_watchdog_fails_the_arm_and_is_killed(tmp_path: Path) -> None:
    async def run() -> tuple[str, float, bool, bool]:
        handle = await started(tmp_path)
        proc = handle.proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(QemuError) as err:
            await handle.arm(time.time() + 60)
        took = time.monotonic() - t0
        await asyncio.wait_for(proc.wait(), 5)  # killed, even though stopped
        return str(err.value), took, handle.proc is None, alive(proc)

    message, took, forgotten, still_alive = asyncio.run(run())
    assert "vm-a" in message and "did not acknowledge" in message
    print(f"a wedged watchdog's arm failed after {took:.2f} s (ack timeout "
          f"{ARM_ACK_TIMEOUT:g} s)")
    assert forgotten and not still_alive


def test_one_armed_watchdog_per_vm_whichever_process(tmp_path: Path) -> None:
    """Two watchdog processes of one VM (an agent's, and the one its killed
    predecessor left armed): the second's arm is refused while the first is armed,
    it works once the first is disarmed, and again once an armed one is killed."""
    async def run() -> None:
        key = str(tmp_path / "vm-a.qmp")
        old, new = await started(tmp_path, "vm-a", key), await started(tmp_path, "vm-a", key)
        other = await started(tmp_path, "vm-b")
        try:
            await old.arm(time.time() + 60)
            with pytest.raises(QemuError) as err:
                await new.arm(time.time() + 60)
            assert "busy" not in str(err.value) and "a freeze watchdog of this VM" in str(err.value)
            assert new.proc is not None and alive(new.proc)  # refused, not replaced
            await other.arm(time.time() + 60)              # another VM is not held
            with pytest.raises(QemuError):                 # nor is a re-arm of the same one
                await old.arm(time.time() + 60)
            await old.disarm()
            await new.arm(time.time() + 60)
            with pytest.raises(QemuError):
                await old.arm(time.time() + 60)
            assert new.proc is not None
            new.proc.kill()                                # an armed one dies: VM free
            await new.proc.wait()
            await old.arm(time.time() + 60)
            await old.disarm()
            await other.disarm()
        finally:
            for handle in (old, new, other):
                if handle.proc is not None:
                    handle.kill(handle.proc)
                await asyncio.wait_for(asyncio.gather(*handle._reaping), 10)

    asyncio.run(run())


def test_the_claim_is_free_once_disarm_returns(tmp_path: Path) -> None:
    """A disarm is answered only once the VM's claim is let go: the next freeze, often by
    a new watchdog process (after a reconnect the agent retires the old one), is never
    refused "busy" by the one just disarmed (CI saw that race once)."""
    async def run() -> None:
        key = str(tmp_path / "vm-a.qmp")
        handle = await started(tmp_path, "vm-a", key)
        try:
            for _ in range(20):
                await handle.arm(time.time() + 60)
                await handle.disarm()
                assert not held_elsewhere(key), "the claim is still held after disarm returned"
        finally:
            await retired(handle)

    asyncio.run(run())


def test_a_freeze_is_refused_before_staging_while_another_watchdog_holds_the_vm(
        tmp_path: Path) -> None:
    """The claim is checked when the freeze's watchdog is prepared (before the cut's
    targets are made), not only at its arm inside the cut."""
    async def run() -> None:
        key = str(tmp_path / "vm-a.qmp")
        handles = [await started(tmp_path, "vm-a", key)]
        try:
            await handles[0].arm(time.time() + 60)
            with pytest.raises(FreezeRefusedError, match="a freeze watchdog of this VM"):
                await started(tmp_path, "vm-a", key)
            handles.append(await started(tmp_path, "vm-b"))  # another VM is not held
            await handles[0].disarm()
            handles.append(await started(tmp_path, "vm-a", key))
            await handles[-1].arm(time.time() + 60)
            await handles[-1].disarm()
        finally:
            for handle in handles:
                await retired(handle)

    asyncio.run(run())


def test_a_disarm_sent_while_an_arm_waits_for_its_answer_comes_after_it(
        tmp_path: Path) -> None:
    """One command and its answer at a time: a disarm that comes while an arm waits
    for its answer (here the handle still thinks an earlier arm holds) is sent after
    that answer, not read in the middle of it (that raised RuntimeError)."""
    async def run() -> None:
        key = str(tmp_path / "vm-a.qmp")
        handle = await started(tmp_path, "vm-a", key)
        try:
            handle.armed = True  # as after a failed thaw
            await asyncio.gather(handle.arm(time.time() + 60), handle.disarm())
            assert not handle.armed
            assert not held_elsewhere(key), "the disarm did not reach the watchdog"
        finally:
            await retired(handle)

    asyncio.run(run())
