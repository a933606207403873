"""Registration with the coordinator replicas, repeated as this agent's heartbeat.

A heartbeat never waits for QEMU: the inventory (which asks every VM for its disks and
checkpoints) is taken by its own task into a cache, when the agent's transactions or
VM connections change and at least every INVENTORY_EVERY seconds, and a heartbeat
sends only the cache's digest, with the inventory itself only when the digest changed
since the current replica last accepted one (or when the replica asks for it); those
without inventory go to the replica's heartbeat server (its reply names it), which
answers them apart from the replica's transaction work. The heartbeats go from a thread
of their own (own event loop and channels), so none waits behind this agent's transaction
work either. Each
call has a deadline of HEARTBEAT_DEADLINE and a failed one is retried after
RETRY_AFTER, so that a slow answer still leaves a second chance inside the coordinator's
lease on the agent (it keeps it for two heartbeat intervals after each heartbeat, and
the lease lives 20 s after its last keepalive)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from typing import Any

import grpc

from blocktxn import failpoints
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb
from blocktxn.v1 import coordinator_pb2_grpc as cpb_grpc

from .config import AgentConfig
from .participant_messages import OPEN_PHASES
from .replicas import Replicas
from .runner import AgentRunner
from .service import inventory_to_pb

log = logging.getLogger(__name__)
HEARTBEAT_S = 3.0            # until the coordinator's reply says otherwise
HEARTBEAT_DEADLINE = 8.0     # per RegisterAgent call (two tries and a retry pause fit AGENT_TTL)
RETRY_AFTER = 0.5            # after a failed call (then the next replica)
INVENTORY_CHECK = 1.0        # s between two looks at what the agent knows changed
INVENTORY_EVERY = 30.0       # the cached inventory is taken again at least this often
INVENTORY_TIMEOUT = 30.0     # one inventory may take this long (a busy QEMU)
STOP_WAIT = 5.0              # s the heartbeat thread is waited for at stop


class InventoryCache:
    """The last inventory taken, and its digest."""

    def __init__(self) -> None:
        # (digest, inventory), replaced whole: the heartbeat thread reads it at once
        self.current: tuple[str, apb.Inventory | None] = ("", None)
        self.taken = asyncio.Event()

    def set(self, inventory: apb.Inventory) -> None:
        self.current = (hashlib.sha256(
            inventory.SerializeToString(deterministic=True)).hexdigest()[:32], inventory)
        self.taken.set()


def _moved(runner: AgentRunner) -> tuple[object, ...]:
    """What the agent knows changed without asking QEMU: its transactions, open or
    ended (one opens: its disks are busy; one ends: a new checkpoint or none) and its VMs'
    connections (the inventory is taken again when this moves). The steps in between
    change only what the coordinator does not keep (jobs, freezes): a retake each would
    cost every VM a query and the coordinator a registration, per step of every
    transaction."""
    return (tuple(sorted((t, st.phase in OPEN_PHASES)  # (one that opened and ended
                         for t, st in runner.machine.txns.items())),  # between two looks)
            tuple(vm.connected for vm in runner.backends.values()))


async def keep_inventory(runner: AgentRunner, cache: InventoryCache) -> None:
    """Take the inventory into *cache*: within INVENTORY_CHECK s of a change the agent
    knows of (a transaction's phase, a VM connection), and at least every
    INVENTORY_EVERY s (what only QEMU knows: a disk added, a bitmap removed by hand).
    Each take asks every VM for its disks: a cost for QEMU and the agent alike."""
    taken: tuple[object, ...] | None = None
    at = 0.0
    while True:
        failpoints.hit("agent_inventory")  # (tests: a loop held up by synchronous work)
        now = _moved(runner)
        if now != taken or time.monotonic() - at >= INVENTORY_EVERY:
            try:
                cache.set(await asyncio.wait_for(inventory_to_pb(runner), INVENTORY_TIMEOUT))
                taken, at = now, time.monotonic()
            except TimeoutError:
                log.warning("inventory: not taken within %.0fs (the last one is sent)",
                            INVENTORY_TIMEOUT)
            except Exception:  # a bug: the heartbeats go on with the last inventory
                log.exception("inventory: not taken (the last one is sent)")
        await asyncio.sleep(INVENTORY_CHECK)


async def register_forever(runner: AgentRunner, config: AgentConfig,
                           replicas: Replicas, own_thread: bool = True) -> None:
    """Announce this agent to a coordinator replica every few seconds (the interval
    the coordinator asks for), its inventory when it changed; move to the next replica
    on error. The inventory is taken on this loop; the heartbeats go from a thread of
    their own (its own loop, its own channels to the same *replicas*' addresses), so
    that none waits behind this loop's transaction work; without *own_thread*, through
    *replicas* on this loop (the simulation's thousand agents in one process).

    Raises:
        whatever ended the heartbeat thread (a bug).
    """
    cache = InventoryCache()
    keeper = asyncio.create_task(keep_inventory(runner, cache), name="inventory")
    beats = _HeartbeatThread(config, ",".join(replicas.addresses), cache)
    try:
        await cache.taken.wait()
        if own_thread:
            await beats.run()
        else:
            await _heartbeats(config, replicas, cache)
    finally:
        keeper.cancel()
        await beats.stop()


class _HeartbeatThread:
    """``_heartbeats`` on a daemon thread with its own event loop."""

    def __init__(self, config: AgentConfig, addresses: str, cache: InventoryCache) -> None:
        self.config, self.addresses, self.cache = config, addresses, cache
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    async def run(self) -> None:
        """Start the thread; return when it ends (raise what ended it)."""
        home = asyncio.get_running_loop()
        ended: asyncio.Future[None] = home.create_future()

        def report(error: BaseException | None) -> None:
            if ended.done():
                return
            if error is not None:
                ended.set_exception(error)
            else:
                ended.set_result(None)

        def main() -> None:
            error: BaseException | None = None
            try:
                asyncio.run(self._main())
            except BaseException as err:  # reported to the caller's loop
                error = err
            finally:
                self._ready.set()
                with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                    home.call_soon_threadsafe(report, error)

        self._thread = threading.Thread(target=main, name="heartbeat", daemon=True)
        self._thread.start()
        await ended

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        replicas = Replicas(self.addresses, self.config.tls)
        self._task = asyncio.current_task()
        self._ready.set()
        try:
            await _heartbeats(self.config, replicas, self.cache)
        except asyncio.CancelledError:
            pass  # stopped
        finally:
            await replicas.close()

    async def stop(self) -> None:
        """Cancel the heartbeats and wait (STOP_WAIT s at most) for the thread."""
        thread = self._thread
        if thread is None:
            return
        await asyncio.to_thread(self._ready.wait, STOP_WAIT)
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                loop.call_soon_threadsafe(task.cancel)
        await asyncio.to_thread(thread.join, STOP_WAIT)


class _Direct:
    """The replica's heartbeat server (the address its last registration reply named):
    where heartbeats without inventory go, apart from the replica's transaction work."""

    def __init__(self, config: AgentConfig) -> None:
        self.tls = config.tls
        self.address = ""
        self.channel: grpc.aio.Channel | None = None

    def stub(self) -> Any | None:
        if self.channel is None:
            return None
        return cpb_grpc.CoordinatorServiceStub(self.channel)  # typed for sync channels

    async def use(self, address: str) -> None:
        if address != self.address:
            await self.close()
            self.address = address
            self.channel = self.tls.channel(address) if address else None

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)
        self.channel, self.address = None, ""


async def _heartbeats(config: AgentConfig, replicas: Replicas, cache: InventoryCache
                      ) -> None:
    interval = HEARTBEAT_S
    accepted = ""  # the digest whose inventory the current replica holds
    direct = _Direct(config)
    try:
        while True:
            digest, inventory = cache.current
            # the inventory is left out only towards a heartbeat server (a replica that
            # named one knows digests; an older one would take "no inventory" for an
            # empty one); everything else goes to the replica itself
            send = digest != accepted or direct.stub() is None
            stub = None if send else direct.stub()
            where = direct.address if stub is not None else replicas.current
            try:
                reply = await (stub or replicas.stub()).RegisterAgent(
                    cpb.RegisterAgentRequest(
                        agent_id=config.agent_id, address=config.advertise or config.listen,
                        inventory=inventory if send else None, inventory_digest=digest),
                    timeout=HEARTBEAT_DEADLINE)
            except grpc.aio.AioRpcError as err:
                log.warning("registration with %s failed: %s", where,
                            err.details() or err.code().name)
                if stub is None:
                    replicas.failed()
                await direct.close()
                accepted = ""
                await asyncio.sleep(RETRY_AFTER)
                continue
            interval = reply.heartbeat_s or interval
            if reply.send_inventory:
                accepted = ""  # at once, to the replica: this heartbeat did not count
                continue
            if stub is None:
                await direct.use(reply.heartbeat_address)
            if send:
                accepted = digest
            await asyncio.sleep(interval)
    finally:
        await direct.close()
