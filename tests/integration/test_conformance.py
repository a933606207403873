"""One conformance suite for every hypervisor backend of the agent: no lost change across
incrementals, exact reclaim after an abort, a cancel while copying, an I/O error (the
repository full) or a killed VM, point in time, restore equality. ``BackendConformance``
holds the tests; each backend's class only provides the ``make_lab`` fixture (bare
QEMU: qemu-storage-daemon with a stand-in guest agent, quiesce freeze; libvirt: a
libvirt domain, quiesce pause)."""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable

import grpc
import libvirt
import pytest

from blocktxn.demo.guest import Cut
from blocktxn.demo.lab import CLUSTER, images_equal, top_layer_clusters
from blocktxn.v1 import agent_pb2 as pb
from tests.integration.harness import Host, restore, wait_until
from tests.integration.libvirt_lab import LibvirtHost, monitor_log
from tests.integration.smallfs import SmallFs

HELD_SPEED = 16 << 10  # bytes/s: a bare-QEMU copy of a few clusters runs for many seconds


class Lab(abc.ABC):
    """One host with one VM ``vm1`` of two disks, as the conformance tests see it."""

    def __init__(self, host: Host, disks: list[str]) -> None:
        self.host = host
        self.disks = disks
        self.members = [("vm1", d) for d in disks]
        self.workload = host.workloads["vm1"]

    def write(self, clusters: range) -> None:
        for c in clusters:
            for d in self.disks:
                self.workload.write(d, c)

    @property
    def seq(self) -> int:
        return self.workload.seq

    @abc.abstractmethod
    def cut(self, txn: str, mode: pb.BackupMode.ValueType = pb.BACKUP_MODE_AUTO
            ) -> tuple[pb.CutResponse, Cut]:
        """Cut *txn* on every disk; the exact content of the disks at the cut."""

    @abc.abstractmethod
    def cut_held(self, txn: str) -> tuple[pb.CutResponse, Cut]:
        """Cut *txn* so that its copy still runs, whatever the test does, until
        :meth:`abort_held` cancels it."""

    @abc.abstractmethod
    def abort_held(self, txn: str) -> None:
        """Abort *txn* while its copy (from :meth:`cut_held`) is still running: the
        hypervisor's jobs are seen cancelled mid-copy."""

    def backup(self, txn: str, mode: pb.BackupMode.ValueType = pb.BACKUP_MODE_AUTO) -> Cut:
        """A committed backup; the content at its cut."""
        _, cut = self.cut(txn, mode)
        self.host.thaw(txn)
        vote = self.host.prepare(txn)
        assert vote.yes, vote.reason
        self.host.commit(txn)
        return cut

    def checkpoints(self, disk: str) -> dict[str, int]:
        """The disk's checkpoints (the hypervisor's truth) -> dirty bytes."""
        return {n: int(b["count"]) for n, b in self.host.bitmaps("vm1", disk).items()}

    def assert_checkpoint_exact(self, name: str, since_seq: int) -> None:
        """Only *name* is left on each disk, holding exactly what was written since."""
        for d in self.disks:
            assert self.checkpoints(d) == {
                name: len(self.workload.clusters(d, since_seq)) * CLUSTER}, d

    def assert_nothing_left(self, txn: str) -> None:
        assert self.host.jobs("vm1") == []
        assert not list((self.host.agent.repo / "images").glob(f"*/*/{txn}.qcow2"))

    def committed_images(self, *txns: str) -> set[str]:
        """The images of committed *txns*, relative to the images directory."""
        return {f"vm1/{d}/{t}.qcow2" for t in txns for d in self.disks}

    def assert_restores(self, txn: str, cut: Cut) -> None:
        for d in self.disks:
            out = restore(self.host, txn, "vm1", d, f"{txn}-{d}.raw")
            assert images_equal(out, "raw", cut.images[d], "raw"), (txn, d)

    def image(self, txn: str, disk: str) -> set[int]:
        return top_layer_clusters(self.host.image(f"images/vm1/{disk}/{txn}.qcow2"))

    def kill_vm(self) -> None:
        self.host.vms["vm1"].kill()

    def stop_vm(self) -> None:
        """A clean shutdown of QEMU (persistent bitmaps are stored)."""
        self.host.vms["vm1"].stop()

    def restart_vm(self) -> None:
        self.host.vms["vm1"].start()


class QemuLab(Lab):
    def __init__(self, host: Host) -> None:
        super().__init__(host, ["d0", "d1"])

    def cut(self, txn: str, mode: pb.BackupMode.ValueType = pb.BACKUP_MODE_AUTO
            ) -> tuple[pb.CutResponse, Cut]:
        resp = self.host.cut(txn, self.members, mode=mode, quiesce=pb.QUIESCE_FREEZE)
        return resp, self.host.gas["vm1"].cuts[-1]  # the stand-in guest saw the cut

    def cut_held(self, txn: str) -> tuple[pb.CutResponse, Cut]:
        """QEMU's own speed limit holds the copy."""
        resp = self.host.cut(txn, self.members, quiesce=pb.QUIESCE_FREEZE, speed=HELD_SPEED)
        return resp, self.host.gas["vm1"].cuts[-1]

    def abort_held(self, txn: str) -> None:
        jobs = self.host.jobs("vm1")
        assert len(jobs) == 2 and all(
            j["status"] == "running" and j["current-progress"] < j["total-progress"]
            for j in jobs), jobs
        self.host.abort(txn)

    def kill_vm(self) -> None:
        self.workload.detach()
        super().kill_vm()

    def stop_vm(self) -> None:
        self.workload.detach()
        super().stop_vm()

    def restart_vm(self) -> None:
        super().restart_vm()
        self.workload.attach()


class LibvirtLab(Lab):
    def __init__(self, host: Host, fs: SmallFs | None = None) -> None:
        super().__init__(host, ["vda", "vdb"])
        self.fs = fs
        self.failpoints = host.workdir / "failpoints"  # the agent's BLOCKTXN_FAILPOINT_FILE

    def cut(self, txn: str, mode: pb.BackupMode.ValueType = pb.BACKUP_MODE_AUTO
            ) -> tuple[pb.CutResponse, Cut]:
        # the test is the only writer and writes nothing during the cut: the content now
        # is the content at the cut
        cut = self.workload.snapshot(txn)
        return self.host.cut(txn, self.members, mode=mode, quiesce=pb.QUIESCE_PAUSE), cut

    @property
    def _fs(self) -> SmallFs:
        assert self.fs is not None, "a held copy needs the images on a SmallFs"
        return self.fs

    def cut_held(self, txn: str) -> tuple[pb.CutResponse, Cut]:
        """libvirt's backup has no speed limit: the images' file system is frozen once
        the agent created the targets and before libvirt begins the backup (failpoint
        ``agent_backup_begin``), so QEMU's first write to a target waits for the thaw."""
        log = self.host.agent.workdir / "agent.log"
        seen = log.read_text().count("failpoint agent_backup_begin") if log.exists() else 0
        self.failpoints.write_text("agent_backup_begin=delay\n")
        out: list[tuple[pb.CutResponse, Cut]] = []
        cutting = threading.Thread(target=lambda: out.append(self.cut(txn)))
        cutting.start()
        try:
            wait_until(lambda: log.read_text().count("failpoint agent_backup_begin") > seen,
                       timeout=60, what="the agent at backupBegin")
            self._fs.freeze()
        finally:
            self.failpoints.write_text("")
            cutting.join(60)
        if not out:
            self._fs.thaw()
            raise AssertionError("the cut failed")
        return out[0]

    def abort_held(self, txn: str) -> None:
        vm = self.host.domain("vm1")  # type: ignore[attr-defined]
        jobs = vm.qmp("query-jobs")
        assert len(jobs) == 2 and all(j["status"] == "running" for j in jobs), jobs
        aborting = threading.Thread(target=self.host.abort, args=(txn,))
        log = self.host.agent.workdir / "libvirtd-monitor.log"
        try:  # the abort reaches libvirt while both copies wait on the frozen target: the
            # frozen target is thawed only once libvirtd has sent QEMU a cancel of each job
            with monitor_log(log):
                aborting.start()
                wait_until(lambda: sum("QEMU_MONITOR_SEND_MSG" in line and '-cancel"' in line
                                       for line in log.read_text().splitlines()) >= len(jobs),
                           timeout=60, what="libvirtd to send QEMU a cancel of each job")
            assert aborting.is_alive(), "the abort returned while the copy was held"
        finally:
            self._fs.thaw()
            aborting.join(60)
        assert not aborting.is_alive()
        last = vm.dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
                               | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED)
        assert last["type"] == libvirt.VIR_DOMAIN_JOB_CANCELLED, last


class BackendConformance:
    """The tests every backend passes; a subclass provides the ``make_lab`` fixture
    (called with a SmallFs to put the agent's images on it)."""

    @pytest.fixture
    def lab(self, make_lab: Callable[..., Lab]) -> Lab:
        return make_lab()

    def test_a_cancel_while_copying_keeps_every_write_since_the_last_commit(
            self, small_fs: SmallFs, make_lab: Callable[..., Lab]) -> None:
        lab = make_lab(small_fs)
        lab.write(range(0, 16))
        t1 = lab.backup("t1")
        base = lab.seq
        lab.write(range(4, 16, 2))    # before the cut; apart, so not one chunk of QEMU's copy
        resp, _ = lab.cut_held("t2")
        assert [m.mode for m in resp.members] == [pb.BACKUP_MODE_INCREMENTAL] * 2
        lab.host.thaw("t2")
        first = next(iter(lab.host.stub.Status(pb.StatusRequest(txn_id="t2"), timeout=30)))
        assert {d.job_status for d in first.disks} == {"running"}, first
        # while the copy runs, to clusters it does not copy (a write to one it still has
        # to copy is copied to the target first: on libvirt's frozen target it would wait)
        lab.write(range(5, 13, 2))
        lab.write(range(20, 23))
        lab.abort_held("t2")                      # cancelled mid-copy
        lab.host.abort("t2")                      # idempotent
        lab.assert_nothing_left("t2")
        assert small_fs.files() == lab.committed_images("t1")  # no partial image, no scratch
        lab.assert_checkpoint_exact("blocktxn:t1", base)
        cut = lab.backup("t3", pb.BACKUP_MODE_INCREMENTAL)
        for d in lab.disks:
            assert lab.image("t3", d) == lab.workload.clusters(d, base, cut.seq)
        lab.assert_restores("t3", cut)
        lab.assert_restores("t1", t1)

    def test_a_full_repository_fails_the_copy_and_the_retry_is_exact(
            self, small_fs: SmallFs, make_lab: Callable[..., Lab]) -> None:
        lab = make_lab(small_fs)
        lab.write(range(0, 16))
        t1 = lab.backup("t1")
        base = lab.seq
        lab.write(range(0, 40))                   # 2.5 MiB per disk to copy
        small_fs.fill(leave=2 << 20)              # room for the targets, not for the copy
        resp, _ = lab.cut("t2")
        assert [m.mode for m in resp.members] == [pb.BACKUP_MODE_INCREMENTAL] * 2
        lab.host.thaw("t2")
        lab.host.wait_pending("t2")
        vote = lab.host.prepare("t2")             # the copy hit ENOSPC
        assert not vote.yes and "vm1" in vote.reason, vote.reason
        assert "space" in vote.reason.lower(), vote.reason
        lab.host.abort("t2")
        lab.assert_nothing_left("t2")
        assert small_fs.files() == lab.committed_images("t1") | {"ballast"}
        lab.assert_checkpoint_exact("blocktxn:t1", base)
        small_fs.unfill()
        cut = lab.backup("t3", pb.BACKUP_MODE_INCREMENTAL)
        for d in lab.disks:
            assert lab.image("t3", d) == lab.workload.clusters(d, base, cut.seq)
        lab.assert_restores("t3", cut)
        lab.assert_restores("t1", t1)

    def test_full_then_incrementals_restore_exactly_the_cut(self, lab: Lab) -> None:
        lab.write(range(0, 12))
        cuts = [lab.backup("t1")]
        seqs = [lab.seq]
        for txn, clusters in (("t2", range(4, 9)), ("t3", range(20, 23))):
            lab.write(clusters)
            resp, cut = lab.cut(txn)
            assert [m.mode for m in resp.members] == [pb.BACKUP_MODE_INCREMENTAL] * 2
            lab.host.thaw(txn)
            lab.write(range(30, 32))              # after the cut: not in this backup
            assert lab.host.prepare(txn).yes
            lab.host.commit(txn)
            cuts.append(cut)
            seqs.append(cut.seq)
            for d in lab.disks:               # an incremental holds exactly what changed
                assert lab.image(txn, d) == lab.workload.clusters(d, seqs[-2], cut.seq)
        for txn, cut in zip(("t1", "t2", "t3"), cuts, strict=True):
            lab.assert_restores(txn, cut)
        lab.assert_checkpoint_exact("blocktxn:t3", seqs[-1])
        verify = lab.host.stub.Verify(pb.VerifyRequest(set_id="t3"), timeout=60)
        assert verify.ok and len(verify.checks) == 6

    @pytest.mark.parametrize("abort_at", ["copied", "voted"])
    def test_abort_keeps_every_write_since_the_last_commit(self, lab: Lab,
                                                           abort_at: str) -> None:
        lab.write(range(0, 16))
        t1 = lab.backup("t1")
        base = lab.seq
        lab.write(range(4, 10))                   # before the cut
        lab.cut("t2")
        lab.host.thaw("t2")
        lab.write(range(8, 12))                   # after the cut, while or after copying
        assert {d.job_status for d in lab.host.wait_pending("t2")} == {"pending"}
        lab.write(range(12, 14))                  # copied, nothing decided
        if abort_at == "voted":
            assert lab.host.prepare("t2").yes
            lab.write(range(14, 15))              # after the YES vote
        lab.host.abort("t2")
        lab.host.abort("t2")                      # idempotent
        lab.assert_nothing_left("t2")
        lab.assert_checkpoint_exact("blocktxn:t1", base)
        cut = lab.backup("t3", pb.BACKUP_MODE_INCREMENTAL)
        for d in lab.disks:
            assert lab.image("t3", d) == lab.workload.clusters(d, base, cut.seq)
        lab.assert_restores("t3", cut)
        lab.assert_restores("t1", t1)             # the chain before the abort is intact

    @pytest.mark.parametrize("outcome", ["commit", "abort"])
    def test_agent_killed_after_the_copy_completes_exactly_after_restart(
            self, lab: Lab, outcome: str) -> None:
        lab.write(range(0, 16))
        lab.backup("t1")
        base = lab.seq
        lab.write(range(4, 8))
        _, cut = lab.cut("t2")
        lab.host.thaw("t2")
        lab.host.wait_pending("t2")
        if outcome == "abort":
            assert lab.host.prepare("t2").yes       # killed after voting YES
        lab.host.kill_agent()                       # the copy is done inside the hypervisor
        lab.write(range(10, 13))                    # the guest keeps writing meanwhile
        lab.host.start_agent()
        assert lab.host.inventory().open_transactions == ["t2"]
        if outcome == "commit":
            vote = lab.host.prepare("t2")
            assert vote.yes, vote.reason
            lab.host.commit("t2")
            lab.host.commit("t2")                   # idempotent
            for d in lab.disks:
                assert lab.image("t2", d) == lab.workload.clusters(d, base, cut.seq)
            lab.assert_restores("t2", cut)
            lab.assert_checkpoint_exact("blocktxn:t2", cut.seq)
        else:
            lab.host.abort("t2")
            lab.assert_nothing_left("t2")
            lab.assert_checkpoint_exact("blocktxn:t1", base)
            t3 = lab.backup("t3", pb.BACKUP_MODE_INCREMENTAL)
            for d in lab.disks:
                assert lab.image("t3", d) == lab.workload.clusters(d, base, t3.seq)

    def test_vm_killed_after_the_cut_votes_no_and_the_next_auto_backup_is_full(
            self, lab: Lab) -> None:
        lab.write(range(0, 8))
        lab.backup("t1")
        lab.cut("t2")
        lab.host.thaw("t2")
        lab.kill_vm()                             # QEMU dies: NEW is not stored
        wait_until(lambda: not lab.host.inventory().vms[0].connected, what="VM lost")
        vote = lab.host.prepare("t2")
        assert not vote.yes and "vm1" in vote.reason
        lab.host.abort("t2")
        assert not list((lab.host.agent.repo / "images").glob("*/*/t2.qcow2"))
        lab.restart_vm()
        wait_until(lambda: lab.host.inventory().vms[0].connected, what="VM back")
        with pytest.raises(grpc.RpcError) as err:  # strict incremental: a clear error
            lab.cut("t3", pb.BACKUP_MODE_INCREMENTAL)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        lab.write(range(3, 6))
        resp, cut = lab.cut("t4")
        assert [m.mode for m in resp.members] == [pb.BACKUP_MODE_FULL] * 2, resp
        lab.host.thaw("t4")
        assert lab.host.prepare("t4").yes
        lab.host.commit("t4")
        lab.assert_restores("t4", cut)
        lab.assert_checkpoint_exact("blocktxn:t4", cut.seq)


    def test_a_clean_vm_restart_keeps_the_checkpoint(self, lab: Lab) -> None:
        lab.write(range(0, 8))
        lab.backup("t1")
        base = lab.seq
        lab.write(range(2, 5))
        lab.stop_vm()
        wait_until(lambda: not lab.host.inventory().vms[0].connected, what="VM gone")
        lab.restart_vm()
        wait_until(lambda: lab.host.inventory().vms[0].connected, what="VM back")
        cut = lab.backup("t2", pb.BACKUP_MODE_INCREMENTAL)
        for d in lab.disks:
            assert lab.image("t2", d) == lab.workload.clusters(d, base, cut.seq)
        lab.assert_restores("t2", cut)


class TestQemuBackend(BackendConformance):
    @pytest.fixture
    def make_lab(self, make_host: Callable[..., Host]) -> Callable[..., Lab]:
        def make(fs: SmallFs | None = None) -> Lab:
            host = make_host()
            if fs is not None:  # nothing was written there yet
                fs.mount(host.agent.repo / "images")
            return QemuLab(host)
        return make


class TestLibvirtBackend(BackendConformance):
    @pytest.fixture
    def make_lab(self, make_libvirt_host: Callable[..., LibvirtHost]) -> Callable[..., Lab]:
        def make(fs: SmallFs | None = None) -> Lab:
            host = make_libvirt_host(start=False, images_fs=fs.mount if fs else None)
            host.agent.env = {"BLOCKTXN_FAILPOINT_FILE": str(host.workdir / "failpoints")}
            host.start_agent()
            return LibvirtLab(host, fs)
        return make
