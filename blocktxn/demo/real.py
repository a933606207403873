"""`blocktxn demo --real-guests`: the demo's story on real Linux guests.

A private etcd, one coordinator, two agents (hosts ``h1``, ``h2``), each serving one
booted guest (blocktxn/demo/realguest: a Debian kernel, busybox and qemu-guest-agent,
built once from Debian packages and cached) under bare QEMU: a QMP monitor for the agent
and the guest's qemu-ga socket for freeze and thaw. Inside each guest a writer appends
sequence numbers to a file on its ext4 data disk (qcow2) and syncs every 10 records.
The checks: grouped backups with the guests frozen together (each agent's journal shows
every freeze done before any thaw); an incremental cancelled while it copies is aborted
on every host and each disk keeps its checkpoint; the retried incremental commits; every
restored disk is a clean file system (``e2fsck -fn``, no journal recovery) holding the
writer's records 1..N without a gap, at least every record acknowledged before the cut
and exactly the start of the guest's own log after the thaw; the set verifies.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from blocktxn import procs
from blocktxn.client import BackupOptions, ClientError, SyncClient
from blocktxn.demo.lab import AgentProcess, free_port
from blocktxn.demo.realguest.image import build_guest_image, cache_dir
from blocktxn.demo.realguest.qga import call_once
from blocktxn.demo.realguest.records import (
    RestoredDisk,
    freeze_window,
    guest_log,
    overlap_problems,
)
from blocktxn.demo.realguest.vm import DATA_NODE, GuestVm, make_qcow2_data_disk
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb

HOSTS = {"h1": "web", "h2": "db"}  # host -> its one guest
SLOW_SPEED = 16 * 1024  # bytes/s: the cancelled incremental is still copying when cancelled
COMMIT, ABORT = cpb.DECISION_COMMIT, cpb.DECISION_ABORT


class RealGuestDemo:
    example = "blocktxn backup h1/web h2/db --quiesce freeze --wait"

    def __init__(self, workdir: Path, console: Console) -> None:
        self.workdir = workdir
        self.console = console
        self.checks: list[tuple[str, bool]] = []
        self.txns: list[tuple[str, str, int, float]] = []  # id, state, bytes, freeze span
        self.guests: dict[str, GuestVm] = {}
        self.agents: dict[str, AgentProcess] = {}
        self.coordinator_port = free_port()
        self.coordinator: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.coordinator_port}"

    def say(self, text: str) -> None:
        self.console.print(f"[bold cyan]>>[/] {text}")

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, ok))
        self.console.print(f"   {'[green]PASS[/]' if ok else '[red]FAIL[/]'} {name}")
        if detail and not ok:
            self.console.print(f"        {detail}", markup=False)
        return ok

    def target(self, host: str) -> str:
        return f"{host}/{HOSTS[host]}/{DATA_NODE}"

    # ------------------------------------------------------------- cluster
    def start(self) -> None:
        self.say(f"guest image: Debian kernel + busybox + qemu-guest-agent (cache {cache_dir()})")
        image = build_guest_image()
        self.console.print(f"   kernel {image.kernel_release}, build {image.key}")
        self.say("starting a coordinator with its private etcd")
        self.coordinator = subprocess.Popen(
            [*procs.DIE_WITH_PARENT, sys.executable, "-m", "blocktxn.coordinator",
             "--listen", self.address,
             "--name", "coord1", "--data-dir", str(self.workdir / "coordinator")],
            stdout=subprocess.DEVNULL, stderr=open(self.workdir / "coordinator.log", "ab"))
        self.say(f"booting {len(HOSTS)} guests (one per host, ext4 data disk as qcow2, "
                 "a writer appending sequenced records)")
        for host, name in HOSTS.items():
            work = self.workdir / host / name
            work.mkdir(parents=True)
            make_qcow2_data_disk(work / "data.qcow2")
            self.guests[host] = GuestVm(image, work, work / "data.qcow2", data_format="qcow2")
        for g in self.guests.values():  # boot together (QEMU dies with its starting thread)
            g.launch()
        for g in self.guests.values():
            g.wait_ready()
        for host, g in self.guests.items():
            self.console.print(f"   {host}/{HOSTS[host]}: up in {g.boot_seconds or 0:.1f} s "
                               f"({g.accelerator()})")
        self.say("starting an agent per host (bare QEMU: its own QMP monitor, qemu-ga)")
        for host, g in self.guests.items():
            agent = AgentProcess(host, self.workdir / host / "agent", [], {}, extra=[
                "--coordinator", self.address,
                "--vm", f"{HOSTS[host]}={g.agent_qmp_socket},ga={g.agent_socket}"],
                prefix=procs.DIE_WITH_PARENT)
            agent.start()
            self.agents[host] = agent
        client = SyncClient(self.address, timeout=5)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if sum(1 for a in client.agents() if a.live and a.inventory.vms) == len(HOSTS):
                    return
            except Exception:  # the coordinator may not be up yet
                pass
            time.sleep(0.3)
        raise RuntimeError("agents did not register with the coordinator")

    def stop(self) -> None:
        for a in self.agents.values():
            a.stop()
        for g in self.guests.values():
            g.close()
        if self.coordinator and self.coordinator.poll() is None:
            self.coordinator.terminate()
            self.coordinator.wait(30)  # it stops its private etcd

    # ------------------------------------------------------------- helpers
    def logs(self) -> dict[str, list[int]]:
        """Each guest's records, read in the guest through its qemu-ga."""
        return {h: guest_log(g.agent_socket) for h, g in self.guests.items()}

    def checkpoints(self, host: str) -> dict[str, tuple[bool, int]]:
        """The data disk's named bitmaps in QEMU: name -> (recording, dirty bytes)."""
        for n in self.guests[host].qmp("query-named-block-nodes", {"flat": True}):
            if n["node-name"] == DATA_NODE:
                return {b["name"]: (bool(b.get("recording")), int(b.get("count", 0)))
                        for b in n.get("dirty-bitmaps", []) if "name" in b}
        raise KeyError(DATA_NODE)

    def wait_thawed(self, client: SyncClient, txn_id: str) -> None:
        """Until the coordinator recorded a thaw and every guest says it is thawed."""
        deadline = time.monotonic() + 120
        while not client.get(txn_id).thawed_at or not all(
                call_once(g.agent_socket, "guest-fsfreeze-status") == "thawed"
                for g in self.guests.values()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{txn_id}: the guests were not thawed")
            time.sleep(0.02)

    def record(self, done: Any, windows: dict[str, Any]) -> None:
        state = {COMMIT: "committed", ABORT: "aborted"}.get(done.decision, "undecided")
        nbytes = sum(m.bytes_done for m in done.members)
        span = (max(w.thawed_at for w in windows.values())
                - min(w.frozen_at for w in windows.values())) if windows else 0.0
        self.txns.append((done.txn_id, state, nbytes, span))
        self.console.print(f"   {done.txn_id}: {state} {done.reason}".rstrip()
                           + f" ({nbytes} bytes, guests frozen for {span * 1000:.0f} ms)")

    def backup(self, title: str, mode: str) -> tuple[Any, dict[str, list[int]],
                                                     dict[str, list[int]]]:
        """A grouped backup of both guests, frozen together; (the finished transaction,
        each guest's records before the cut, each guest's records after the thaw)."""
        self.say(title)
        client = SyncClient(self.address, timeout=60)
        before = self.logs()
        txn = client.backup([self.target(h) for h in HOSTS],
                            BackupOptions(mode=mode, quiesce="freeze", freeze_timeout=30))
        self.wait_thawed(client, txn.txn_id)
        after_thaw = self.logs()
        done = client.wait(txn.txn_id)
        windows = {h: freeze_window(a.repo, txn.txn_id) for h, a in self.agents.items()}
        self.record(done, windows)
        problems = overlap_problems(windows, done.cut_done_at)
        self.check("every guest was frozen before any was thawed (the agents' journals)",
                   not problems, "; ".join(problems))
        return done, before, after_thaw

    # -------------------------------------------------------------- story
    def run(self) -> bool:
        self.start()
        time.sleep(0.5)
        t1, _, _ = self.backup("1. full grouped backup of both guests, frozen together", "full")
        self.check("full backup committed on both hosts",
                   t1.decision == COMMIT and {m.outcome for m in t1.members} == {"committed"})
        time.sleep(0.5)
        t2, _, _ = self.backup("2. incremental backup", "incremental")
        self.check("incremental committed on both hosts, as incrementals",
                   t2.decision == COMMIT
                   and {m.mode for m in t2.members} == {apb.BACKUP_MODE_INCREMENTAL})
        time.sleep(1.0)

        self.say(f"3. an incremental limited to {SLOW_SPEED // 1024} KiB/s, cancelled while "
                 "it copies")
        client = SyncClient(self.address, timeout=60)
        dirty_before = {h: self.checkpoints(h) for h in HOSTS}
        t3 = client.backup([self.target(h) for h in HOSTS], BackupOptions(
            mode="incremental", quiesce="freeze", freeze_timeout=30, speed=SLOW_SPEED))
        deadline = time.monotonic() + 60
        while (client.get(t3.txn_id).phase < cpb.TXN_PHASE_RUNNING
               and time.monotonic() < deadline):
            time.sleep(0.02)
        try:
            client.cancel(t3.txn_id, "the demo cancels it")
        except ClientError as err:  # it ended first: the checks below say so
            self.console.print(f"   cancel refused: {err}")
        done3 = client.wait(t3.txn_id)
        self.record(done3, {h: freeze_window(a.repo, t3.txn_id)
                            for h, a in self.agents.items()})
        self.check("cancelled transaction aborted on every host",
                   done3.decision == ABORT and {m.outcome for m in done3.members} == {"aborted"})
        kept = []
        name = f"blocktxn:{t2.txn_id}"
        for h in HOSTS:
            now = self.checkpoints(h)
            recording, dirty = now.get(name, (False, -1))
            kept.append(set(now) == {name} and recording
                        and dirty >= dirty_before[h].get(name, (False, 0))[1])
        self.check("every disk kept its checkpoint, still recording every write since the "
                   "last commit", all(kept))

        t4, before, after_thaw = self.backup("4. retried incremental", "incremental")
        if not self.check("retried incremental committed", t4.decision == COMMIT):
            return False

        self.say(f"5. restore of set {t4.set_id} (full + two incrementals per disk)")
        for h, agent in self.agents.items():
            out = agent.restore_dir / f"{h}-{HOSTS[h]}.raw"
            client.restore(t4.set_id, self.target(h), str(out))
            disk = RestoredDisk.read(out)
            problems = disk.problems(len(before[h]), after_thaw[h])
            self.check(f"{self.target(h)}: clean ext4, no journal recovery, records 1.."
                       f"{len(disk.records)} (>= {len(before[h])} acknowledged before the "
                       f"cut, <= {len(after_thaw[h])} after the thaw), the start of the "
                       "guest's own log", bool(disk.records) and not problems,
                       "; ".join(problems))
        self.check("verify: qemu-img check and checksums of every chain",
                   client.verify(t4.set_id).ok)
        return all(ok for _, ok in self.checks)

    def summary(self) -> None:
        table = Table(title="blocktxn demo, real guests")
        for c in ("transaction", "outcome", "bytes", "guests frozen"):
            table.add_column(c)
        for txn_id, state, nbytes, span in self.txns:
            table.add_row(txn_id, state, str(nbytes), f"{span * 1000:.0f} ms" if span else "-")
        self.console.print(table)
        passed = sum(1 for _, ok in self.checks if ok)
        self.console.print(f"checks passed: {passed}/{len(self.checks)}")
