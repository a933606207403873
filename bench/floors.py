"""The floors: the same work done directly on QEMU by one script, measured on the same
qemu-storage-daemon and in the same run as what it bounds.

- ``grouped``: QEMU's own single-process grouped ``transaction`` of incremental
  ``blockdev-backup`` jobs onto null-co targets, zero dirty data, ``transaction`` →
  every job concluded and dismissed. What one QEMU process needs to run a group of
  backup jobs at all.
- ``durable``: the durable work of one zero-dirty incremental, as the agent does it,
  without the agent: an empty qcow2 target per disk with the previous image as backing
  (written in-process, as the agent writes it: what ``qemu-img create -u -b PREVIOUS``
  writes), ``blockdev-add`` of each, ONE
  ``transaction`` adding a new persistent checkpoint bitmap and starting
  ``blockdev-backup sync=bitmap bitmap=OLD bitmap-mode=never`` with ``auto-finalize:
  false``, every job ``pending``, then ``job-finalize`` → ``job-dismiss`` →
  ``blockdev-del``, ``fsync`` of every image and its directory,
  ``block-dirty-bitmap-remove`` of the old checkpoint.

Both speak QMP on the VM's second monitor (``LabVm.probe_socket``); their bitmaps and
nodes are their own (``bench-``), which the agent never touches.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from qemu.qmp import EventListener, QMPClient

from blocktxn.agent import qcow2
from blocktxn.agent.jsonl import fsync_dir, fsync_file
from blocktxn.agent.repository import run_tool
from blocktxn.demo.lab import LabVm

TOOL_TIMEOUT = 60.0
JOB_TIMEOUT = 60.0


class Qmp:
    """One direct QMP session, with the status history of every block job."""

    def __init__(self, client: QMPClient) -> None:
        self.client = client
        self._listener = EventListener(("JOB_STATUS_CHANGE",))
        client.register_listener(self._listener)
        self._seen: dict[str, set[str]] = {}
        self._changed = asyncio.Condition()
        self._pump = asyncio.create_task(self._follow())

    @classmethod
    async def open(cls, socket_path: Path) -> Qmp:
        client = QMPClient("bench")
        await client.connect(str(socket_path))
        return cls(client)

    async def run(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return await self.client.execute(cmd, args)

    async def _follow(self) -> None:
        async for ev in self._listener:
            data = cast(dict[str, Any], ev["data"])
            async with self._changed:
                self._seen.setdefault(str(data["id"]), set()).add(str(data["status"]))
                self._changed.notify_all()

    async def wait_jobs(self, ids: Sequence[str], status: str) -> None:
        """Until every job of *ids* has been in *status* (job ids are never reused)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(
                lambda: all(status in self._seen.get(i, ()) for i in ids)), JOB_TIMEOUT)

    async def close(self) -> None:
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump
        self.client.remove_listener(self._listener)
        await self.client.disconnect()


def incremental_backups(disks: Sequence[str], bitmap: str, targets: Sequence[str],
                        tag: str) -> list[dict[str, Any]]:
    """``blockdev-backup sync=incremental`` actions (QEMU's own bitmap handling)."""
    return [{"type": "blockdev-backup", "data": {
        "job-id": f"bench-{tag}-{d}", "device": d, "target": t, "sync": "incremental",
        "bitmap": bitmap}} for d, t in zip(disks, targets, strict=True)]


async def add_null_targets(q: Qmp, vm: LabVm, disks: Sequence[str], tag: str) -> list[str]:
    targets = [f"bench-null-{tag}-{d}" for d in disks]
    size = {d.name: d.size for d in vm.disks}
    await asyncio.gather(*(q.run("blockdev-add", {"driver": "null-co", "node-name": t,
                                                  "size": size[d]})
                           for d, t in zip(disks, targets, strict=True)))
    return targets


class Floors:
    """Both floors on one VM (every disk of it), rep after rep."""

    def __init__(self, q: Qmp, vm: LabVm, workdir: Path) -> None:
        self.q, self.vm, self.workdir = q, vm, workdir
        self.disks = [d.name for d in vm.disks]
        self.size = {d.name: d.size for d in vm.disks}
        self.reps = 0
        self.checkpoint = "bench-durable-0"
        self.previous: dict[str, Path] = {}

    @classmethod
    async def open(cls, vm: LabVm, workdir: Path) -> Floors:
        self = cls(await Qmp.open(vm.probe_socket), vm, workdir)
        await asyncio.gather(*(self.q.run("block-dirty-bitmap-add",
                                          {"node": d, "name": "bench-grouped"})
                               for d in self.disks))
        await asyncio.gather(*(self.q.run("block-dirty-bitmap-add", {
            "node": d, "name": self.checkpoint, "persistent": True}) for d in self.disks))
        await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
        for d in self.disks:  # the previous backup of each disk: an empty image
            self.previous[d] = workdir / f"{d}-base.qcow2"
            await run_tool("qemu-img", "create", "-q", "-f", "qcow2", str(self.previous[d]),
                           str(self.size[d]), timeout=TOOL_TIMEOUT)
        return self

    async def grouped(self) -> float:
        """ms: one grouped transaction of every disk's incremental, to all dismissed."""
        self.reps += 1
        tag = f"g{self.reps}"
        targets = await add_null_targets(self.q, self.vm, self.disks, tag)
        t0 = time.perf_counter()
        await self.q.run("transaction", {
            "actions": incremental_backups(self.disks, "bench-grouped", targets, tag),
            "properties": {"completion-mode": "grouped"}})
        await self.q.wait_jobs([f"bench-{tag}-{d}" for d in self.disks], "null")
        elapsed = (time.perf_counter() - t0) * 1000
        await asyncio.gather(*(self.q.run("blockdev-del", {"node-name": t}) for t in targets))
        return elapsed

    async def durable(self) -> float:
        """ms: the durable work of one incremental of every disk (see the module)."""
        self.reps += 1
        tag = f"d{self.reps}"
        new_checkpoint = f"bench-durable-{self.reps}"
        images = {d: self.workdir / f"{d}-{self.reps}.qcow2" for d in self.disks}
        nodes = {d: f"bench-t{self.reps}-{d}" for d in self.disks}
        jobs = {d: f"bench-{tag}-{d}" for d in self.disks}
        t0 = time.perf_counter()
        for d in self.disks:  # the agent's own in-process writer
            qcow2.create(images[d], self.size[d], self.previous[d].name)
        await asyncio.gather(*(self.q.run("blockdev-add", {
            "driver": "qcow2", "node-name": nodes[d], "backing": None,
            "file": {"driver": "file", "filename": str(images[d])}}) for d in self.disks))
        actions: list[dict[str, Any]] = [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": d, "name": new_checkpoint, "persistent": True}}
            for d in self.disks]
        actions += [{"type": "blockdev-backup", "data": {
            "job-id": jobs[d], "device": d, "target": nodes[d], "sync": "bitmap",
            "bitmap": self.checkpoint, "bitmap-mode": "never",
            "auto-finalize": False, "auto-dismiss": False}} for d in self.disks]
        await self.q.run("transaction", {"actions": actions,
                                         "properties": {"completion-mode": "individual"}})
        await self.q.wait_jobs(list(jobs.values()), "pending")

        async def finish(d: str) -> None:
            await self.q.run("job-finalize", {"id": jobs[d]})
            await self.q.wait_jobs([jobs[d]], "concluded")
            await self.q.run("job-dismiss", {"id": jobs[d]})
            await self.q.run("blockdev-del", {"node-name": nodes[d]})

        await asyncio.gather(*(finish(d) for d in self.disks))

        def durable() -> None:
            for image in images.values():
                fsync_file(image)
            fsync_dir(self.workdir)

        await asyncio.to_thread(durable)
        await asyncio.gather(*(self.q.run("block-dirty-bitmap-remove", {
            "node": d, "name": self.checkpoint}) for d in self.disks))
        elapsed = (time.perf_counter() - t0) * 1000
        for d in self.disks:
            if not self.previous[d].name.endswith("-base.qcow2"):
                self.previous[d].unlink(missing_ok=True)
            self.previous[d] = images[d]
        self.checkpoint = new_checkpoint
        return elapsed

    async def close(self) -> None:
        """Drop the floors' bitmaps (the VM stays as the agent knows it)."""
        with contextlib.suppress(Exception):
            await asyncio.gather(*(self.q.run("block-dirty-bitmap-remove", {
                "node": d, "name": name}) for d in self.disks
                for name in ("bench-grouped", self.checkpoint)))
        await self.q.close()
