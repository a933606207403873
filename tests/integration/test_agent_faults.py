"""Abort, I/O errors, killed agents, killed VMs, missed thaws: no dirty bit is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from blocktxn.agent.watchdog import ENDING_WINDOW
from blocktxn.demo.lab import CLUSTER, images_equal, top_layer_clusters
from blocktxn.v1 import agent_pb2 as pb
from tests.integration.harness import Host, iter_files, restore, wait_until

DISKS = [("vm1", "d0"), ("vm1", "d1")]
SLOW = 512 << 10  # bytes/s: keeps a job running long enough to write during it


def write_clusters(host: Host, clusters: range, byte: int | None = None) -> None:
    wl = host.workloads["vm1"]
    for c in clusters:
        for _, disk in DISKS:
            wl.write(disk, c, byte)


def assert_checkpoint_exact(host: Host, bitmap: str, since_seq: int) -> None:
    """Only *bitmap* is left on each disk, and it holds exactly the clusters written since."""
    wl = host.workloads["vm1"]
    for vm, disk in DISKS:
        bitmaps = host.bitmaps(vm, disk)
        assert set(bitmaps) == {bitmap}, bitmaps
        assert bitmaps[bitmap]["recording"] and not bitmaps[bitmap].get("inconsistent")
        assert bitmaps[bitmap]["count"] == len(wl.clusters(disk, since_seq)) * CLUSTER


def assert_nothing_left(host: Host, txn: str) -> None:
    assert host.jobs("vm1") == []
    nodes = {n["node-name"] for n in host.qmp("vm1", "query-named-block-nodes", {"flat": True})}
    assert not {n for n in nodes if n.startswith("btx")}
    assert not list((host.agent.repo / "images").glob(f"*/*/{txn}.qcow2"))


def next_incremental_is_exact(host: Host, txn: str, since_seq: int) -> None:
    """The next incremental holds exactly what was written since *since_seq* and restores."""
    wl, ga = host.workloads["vm1"], host.gas["vm1"]
    vote = host.backup(txn, DISKS, mode=pb.BACKUP_MODE_INCREMENTAL)
    assert vote.yes, vote.reason
    cut = ga.cuts[-1]
    for vm, disk in DISKS:
        image = host.image(f"images/{vm}/{disk}/{txn}.qcow2")
        assert top_layer_clusters(image) == wl.clusters(disk, since_seq, cut.seq)
        out = restore(host, txn, vm, disk, f"{txn}-{disk}.raw")
        assert images_equal(out, "raw", cut.images[disk], "raw")


def slow_image_creation(host: Host) -> None:
    """Restart *host*'s agent so that creating each target image takes 1.5 s more."""
    host.agent.env = {"BLOCKTXN_FAILPOINTS": "agent_create_image=delay"}
    host.restart_agent()


@pytest.mark.parametrize("abort_at", ["pending", "voted"])
def test_abort_at_barrier_keeps_every_write_since_last_commit(
    make_host: Callable[..., Host], abort_at: str
) -> None:
    host = make_host()
    write_clusters(host, range(0, 48))
    assert host.backup("t1", DISKS).yes
    base = host.gas["vm1"].cuts[-1].seq
    write_clusters(host, range(10, 30))               # before the cut
    host.cut("t2", DISKS, speed=SLOW)
    host.thaw("t2")
    first = next(iter(host.stub.Status(pb.StatusRequest(txn_id="t2"), timeout=10)))
    statuses = {d.job_status for d in first.disks}
    assert statuses == {"running"}, statuses
    write_clusters(host, range(25, 36))               # while the jobs run (throttled)
    progress = host.wait_pending("t2")
    assert {d.job_status for d in progress} == {"pending"}
    write_clusters(host, range(40, 44))               # while the jobs wait at the barrier
    if abort_at == "voted":
        vote = host.prepare("t2")
        assert vote.yes
        write_clusters(host, range(44, 46))           # after the YES vote
    host.abort("t2")
    host.abort("t2")                                  # idempotent
    assert_nothing_left(host, "t2")
    assert_checkpoint_exact(host, "blocktxn:t1", base)
    next_incremental_is_exact(host, "t3", base)
    # the abort left the previous chain intact: t1 still restores to its cut
    out = restore(host, "t1", "vm1", "d0", "t1-d0.raw")
    assert images_equal(out, "raw", host.gas["vm1"].cuts[0].images["d0"], "raw")


def test_read_error_on_one_disk_aborts_every_job_and_reclaims_every_bitmap(
    make_host: Callable[..., Host],
) -> None:
    host = make_host(read_error=("d1",))
    write_clusters(host, range(0, 16))
    assert host.backup("t1", DISKS).yes
    base = host.gas["vm1"].cuts[-1].seq
    write_clusters(host, range(4, 12))
    host.workloads["vm1"].arm_read_error("d1", 5)     # blkdebug: every read of d1 fails now
    host.cut("t2", DISKS)
    host.thaw("t2")
    progress = {d.disk: d for d in host.wait_pending("t2")}
    assert progress["d0"].job_status == "pending"
    assert progress["d1"].job_status == "concluded" and progress["d1"].error
    vote = host.prepare("t2")
    assert not vote.yes and "d1" in vote.reason and "error" in vote.reason.lower()
    with pytest.raises(grpc.RpcError) as err:
        host.commit("t2")                             # a NO voter cannot commit
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    host.abort("t2")
    assert_nothing_left(host, "t2")
    assert_checkpoint_exact(host, "blocktxn:t1", base)


@pytest.mark.parametrize("outcome", ["commit", "abort"])
def test_agent_killed_at_the_barrier_completes_exactly_after_restart(
    make_host: Callable[..., Host], outcome: str
) -> None:
    host = make_host()
    wl, ga = host.workloads["vm1"], host.gas["vm1"]
    write_clusters(host, range(0, 32))
    assert host.backup("t1", DISKS).yes
    base = ga.cuts[-1].seq
    write_clusters(host, range(8, 16))
    host.cut("t2", DISKS)
    host.thaw("t2")
    host.wait_pending("t2")
    if outcome == "abort":
        assert host.prepare("t2").yes                 # killed after voting YES
    host.kill_agent()                                 # jobs stay pending inside QEMU
    assert {j["status"] for j in host.jobs("vm1")} == ({"pending"} if outcome == "commit"
                                                       else set())
    write_clusters(host, range(20, 26))               # the guest keeps writing meanwhile
    host.start_agent()
    assert host.inventory().open_transactions == ["t2"]
    if outcome == "commit":
        assert host.prepare("t2").yes
        host.commit("t2")
        host.commit("t2")                             # idempotent
        cut = ga.cuts[-1]
        for vm, disk in DISKS:
            image = host.image(f"images/{vm}/{disk}/t2.qcow2")
            assert top_layer_clusters(image) == wl.clusters(disk, base, cut.seq)
            out = restore(host, "t2", vm, disk, f"t2-{disk}.raw")
            assert images_equal(out, "raw", cut.images[disk], "raw")
        assert_checkpoint_exact(host, "blocktxn:t2", cut.seq)
    else:
        host.abort("t2")
        assert_nothing_left(host, "t2")
        assert_checkpoint_exact(host, "blocktxn:t1", base)
        next_incremental_is_exact(host, "t3", base)


def test_vm_killed_during_backup_votes_no_and_next_auto_backup_is_full(
    make_host: Callable[..., Host],
) -> None:
    host = make_host()
    wl, ga, vm = host.workloads["vm1"], host.gas["vm1"], host.vms["vm1"]
    write_clusters(host, range(0, 32))
    assert host.backup("t1", DISKS).yes
    host.cut("t2", DISKS, speed=SLOW)
    host.thaw("t2")
    wl.detach()
    vm.kill()                                         # QEMU dies mid-backup
    vote = host.prepare("t2")
    assert not vote.yes and "vm1" in vote.reason
    host.abort("t2")
    assert not list((host.agent.repo / "images").glob("*/*/t2.qcow2"))

    vm.start()                                        # same images, bitmaps never stored
    wl.attach()
    wait_until(lambda: host.inventory().vms[0].connected, what="agent reconnect")
    disks = {d.name: d for d in host.inventory().vms[0].disks}
    assert not disks["d0"].checkpoint_usable and disks["d0"].checkpoint_problem
    with pytest.raises(grpc.RpcError) as err:         # strict incremental: a clear error
        host.cut("t3", DISKS, mode=pb.BACKUP_MODE_INCREMENTAL)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "incremental" in (err.value.details() or "")
    write_clusters(host, range(3, 6))
    cut = host.cut("t3", DISKS, mode=pb.BACKUP_MODE_AUTO)
    assert [m.mode for m in cut.members] == [pb.BACKUP_MODE_FULL] * 2
    assert all("missing" in m.mode_reason or "inconsistent" in m.mode_reason
               for m in cut.members)
    host.thaw("t3")
    assert host.prepare("t3").yes
    host.commit("t3")
    for _, disk in DISKS:
        out = restore(host, "t3", "vm1", disk, f"t3-{disk}.raw")
        assert images_equal(out, "raw", ga.cuts[-1].images[disk], "raw")


def test_clean_vm_restart_keeps_the_persistent_checkpoint(make_host: Callable[..., Host]) -> None:
    host = make_host()
    wl, vm = host.workloads["vm1"], host.vms["vm1"]
    write_clusters(host, range(0, 8))
    assert host.backup("t1", DISKS).yes
    base = host.gas["vm1"].cuts[-1].seq
    write_clusters(host, range(2, 5))
    wl.detach()
    vm.stop()                                         # clean close stores the bitmaps
    vm.start()
    wl.attach()
    wait_until(lambda: host.inventory().vms[0].connected, what="agent reconnect")
    next_incremental_is_exact(host, "t2", base)


def test_freeze_deadline_thaws_without_coordinator_and_votes_no(
    make_host: Callable[..., Host],
) -> None:
    host = make_host()
    ga = host.gas["vm1"]
    write_clusters(host, range(0, 8))
    assert host.backup("t1", DISKS).yes
    base = ga.cuts[-1].seq
    host.workloads["vm1"].start_background(interval=0.005)
    # 3 s: the whole cut (arm, freeze, job start) must fit in it, on a loaded machine too
    cut = host.cut("t2", DISKS, freeze_timeout=3.0)
    assert ga.is_frozen
    wait_until(lambda: not ga.is_frozen, timeout=30, what="auto-thaw")
    start, end = ga.frozen_intervals[-1]
    assert start < cut.freeze_deadline - 0.05 <= end < cut.freeze_deadline + 2.0
    thaw = host.thaw("t2")
    assert thaw.thawed_on_own
    vote = host.prepare("t2")
    assert not vote.yes and "deadline" in vote.reason
    host.abort("t2")
    host.workloads["vm1"].stop_background()
    assert_nothing_left(host, "t2")
    assert_checkpoint_exact(host, "blocktxn:t1", base)


def test_guest_agent_that_never_answers_freeze_fails_the_cut_within_the_deadline(
    make_host: Callable[..., Host],
) -> None:
    host = make_host()
    host.gas["vm1"].answer_freeze = False
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        host.cut("t1", DISKS, freeze_timeout=1.0)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert time.monotonic() - started < 10
    assert_nothing_left(host, "t1")
    assert host.bitmaps("vm1", "d0") == {}
    assert list(iter_files(host.agent.repo / "images")) == []


def test_a_failed_cut_waits_for_every_step_in_flight_before_rolling_back(
    make_host: Callable[..., Host],
) -> None:
    """Found by the chaos suite (repository full during the cut): one target image failed
    while another was still being created, and the rollback ran before it finished, leaving
    a stray image. Here d1's image directory is blocked by a file."""
    disks = [f"d{i}" for i in range(6)]
    host = make_host({"vm1": disks})
    slow_image_creation(host)  # d0..d4 are still being created when d5 fails
    blocker = host.agent.repo / "images" / "vm1" / "d5"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory")
    with pytest.raises(grpc.RpcError) as err:
        host.cut("t1", [("vm1", d) for d in disks])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot create" in (err.value.details() or "")
    time.sleep(1.0)  # anything still in flight would land now
    assert not list((host.agent.repo / "images").glob("*/*/t1.qcow2"))
    assert host.jobs("vm1") == [] and not host.gas["vm1"].is_frozen
    assert all(host.bitmaps("vm1", d) == {} for d in disks)
    # and no freeze watchdog is left armed: without the agent, an unarmed one exits at once
    watchdogs = watchdog_pids(host)
    host.kill_agent()
    wait_until(lambda: not any(alive(p) for p in watchdogs), timeout=15,
               what="the unarmed watchdog's exit")


def test_one_watchdog_serves_every_freeze_and_a_dead_one_is_replaced(
    make_host: Callable[..., Host],
) -> None:
    """The watchdog is kept from one freeze to the next (no process start per
    transaction); one that died is replaced at the next cut, which still freezes."""
    host = make_host()
    ga = host.gas["vm1"]
    assert host.backup("t1", DISKS).yes
    first = watchdog_pids(host)
    assert len(first) == 1
    assert host.backup("t2", DISKS).yes
    assert watchdog_pids(host) == first
    os.kill(first[0], signal.SIGKILL)
    wait_until(lambda: watchdog_pids(host) == [], timeout=5, what="the watchdog's death")
    assert host.backup("t3", DISKS).yes
    assert len(ga.cuts) == 3 and not ga.is_frozen
    assert len(watchdog_pids(host)) == 1 and watchdog_pids(host) != first


def watchdog_pids(host: Host) -> list[int]:
    """The agent's freeze watchdog processes."""
    assert host.agent.proc is not None
    out = subprocess.run(["pgrep", "-P", str(host.agent.proc.pid), "-f",
                          "blocktxn.agent.qemu.watchdog"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_a_stopped_agent_cannot_keep_a_guest_frozen(make_host: Callable[..., Host]) -> None:
    """Bounded freeze whatever happens to the agent: its watchdog process thaws the guest
    at the deadline while the agent itself is SIGSTOPped; the agent then votes NO."""
    host = make_host()
    ga = host.gas["vm1"]
    write_clusters(host, range(0, 8))
    assert host.backup("t1", DISKS).yes
    base = ga.cuts[-1].seq
    cut = host.cut("t2", DISKS, freeze_timeout=3.0)
    assert ga.is_frozen
    assert host.agent.proc is not None
    host.agent.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: not ga.is_frozen, timeout=30, what="watchdog thaw")
        start, end = ga.frozen_intervals[-1]
        assert start < cut.freeze_deadline - 0.05 <= end < cut.freeze_deadline + 2.0
    finally:
        host.agent.proc.send_signal(signal.SIGCONT)
    assert host.thaw("t2").thawed_on_own
    vote = host.prepare("t2")
    assert not vote.yes and "deadline" in vote.reason
    write_clusters(host, range(3, 5))
    host.abort("t2")
    assert_nothing_left(host, "t2")
    assert_checkpoint_exact(host, "blocktxn:t1", base)


def test_a_failed_thaw_keeps_the_watchdog_armed_and_votes_no(
    make_host: Callable[..., Host],
) -> None:
    host = make_host()
    ga = host.gas["vm1"]
    host.cut("t1", DISKS, freeze_timeout=4)
    assert ga.is_frozen
    ga.fail_thaws = 1                       # the agent's thaw fails once
    thaw = host.thaw("t1")
    assert thaw.thawed_on_own               # not a coordinated thaw: the coordinator aborts
    assert ga.is_frozen
    wait_until(lambda: not ga.is_frozen, timeout=10, what="the watchdog's thaw")
    start, end = ga.frozen_intervals[-1]
    assert end - start < 4 + 1.5            # by the deadline, retries included
    vote = host.prepare("t1")
    assert not vote.yes and "thaw failed" in vote.reason
    host.abort("t1")
    assert_nothing_left(host, "t1")


def test_a_restarted_agent_thaws_what_it_froze_before_it_died(
    make_host: Callable[..., Host],
) -> None:
    """Recovery thaws at once: the journal says the guest may be frozen, so the
    restarted agent thaws it without waiting for the deadline."""
    host = make_host()
    ga = host.gas["vm1"]
    host.cut("t1", DISKS, freeze_timeout=60)
    assert ga.is_frozen
    host.restart_agent()                    # SIGKILL, then start again
    wait_until(lambda: not ga.is_frozen, timeout=10, what="thaw after restart")
    start, end = ga.frozen_intervals[-1]
    assert end - start < 30                 # long before the 60 s deadline
    vote = host.prepare("t1")
    assert not vote.yes
    host.abort("t1")
    assert_nothing_left(host, "t1")


def test_a_restart_after_the_stage_leaves_a_freeze_held_by_someone_else(
    make_host: Callable[..., Host],
) -> None:
    """The agent dies after the Stage of a freeze cut, before the Cut froze anything,
    while the guest is frozen by someone else (an operator's own fsfreeze): the
    restarted agent rolls its staged cut back and does NOT thaw that guest."""
    host = make_host()
    ga = host.gas["vm1"]
    host.stub.Cut(pb.CutRequest(
        txn_id="t1", quiesce=pb.QUIESCE_FREEZE, freeze_timeout_s=10, stage_only=True,
        members=[pb.CutMember(vm=v, disk=d) for v, d in DISKS]), timeout=60)
    assert not ga.is_frozen and list((host.agent.repo / "images").glob("*/*/t1.qcow2"))
    ga._dispatch({"execute": "guest-fsfreeze-freeze"})      # the operator's freeze
    assert ga.is_frozen
    host.restart_agent()                    # SIGKILL, then start again (recovery done)
    assert ga.is_frozen and ga.frozen_intervals == [], "a freeze it never made was thawed"
    vote = host.prepare("t1")
    assert not vote.yes
    assert_nothing_left(host, "t1")         # the staged targets were rolled back
    ga._dispatch({"execute": "guest-fsfreeze-thaw"})        # the operator's thaw
    assert host.backup("t2", DISKS).yes     # the disks are free again


def test_an_abort_does_not_wait_behind_a_prepare_still_copying(
    make_host: Callable[..., Host],
) -> None:
    """After another agent votes NO, the coordinator's Abort stops this agent's copy at
    once, although its Prepare is still waiting for the jobs."""
    import threading

    host = make_host()
    write_clusters(host, range(0, 48))
    assert host.backup("t1", DISKS).yes
    base = host.gas["vm1"].cuts[-1].seq
    write_clusters(host, range(0, 48))
    host.cut("t2", DISKS, speed=SLOW // 4)           # minutes of copying
    host.thaw("t2")
    votes: list[pb.PrepareResponse] = []
    preparing = threading.Thread(target=lambda: votes.append(host.prepare("t2")))
    preparing.start()
    time.sleep(1.0)                                   # Prepare waits for the jobs now
    t0 = time.monotonic()
    host.abort("t2")
    took = time.monotonic() - t0
    preparing.join(30)
    assert took < 10, f"abort waited {took:.1f}s behind the prepare"
    assert votes and not votes[0].yes
    assert_nothing_left(host, "t2")
    assert_checkpoint_exact(host, "blocktxn:t1", base)


def test_a_cut_whose_caller_gave_up_still_ends_cleanly(make_host: Callable[..., Host]) -> None:
    """The Cut RPC's deadline passes while the guest agent is still freezing: the cut
    is not abandoned half-way (a guest left quiesced, a transaction stuck cutting); it
    completes, and the deadline's auto-thaw then makes the agent vote NO."""
    host = make_host()
    ga = host.gas["vm1"]
    ga.freeze_delay = 1.5
    req = pb.CutRequest(txn_id="t1", quiesce=pb.QUIESCE_FREEZE, freeze_timeout_s=4,
                        members=[pb.CutMember(vm=v, disk=d) for v, d in DISKS])
    with pytest.raises(grpc.RpcError) as err:
        host.stub.Cut(req, timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: ga.is_frozen, timeout=30, what="the freeze")
    wait_until(lambda: not ga.is_frozen, timeout=30, what="the auto-thaw")
    update = next(iter(host.stub.Status(pb.StatusRequest(txn_id="t1"), timeout=10)))
    assert update.phase == pb.PARTICIPANT_PHASE_RUNNING and "deadline" in update.failure
    assert not host.prepare("t1").yes
    host.abort("t1")
    assert_nothing_left(host, "t1")


def test_two_freezes_of_one_vm_cannot_overlap(make_host: Callable[..., Host]) -> None:
    """Two transactions on different disks of one VM, both with freeze: the second is
    refused while the first is still cutting (before it has frozen anything), so one
    watchdog cannot replace the other and one rollback cannot thaw the other's cut."""
    import threading

    host = make_host()
    slow_image_creation(host)
    first: list[pb.CutResponse] = []
    cutting = threading.Thread(target=lambda: first.append(host.cut("t1", [("vm1", "d0")])))
    cutting.start()
    wait_until(lambda: "t1" in host.inventory().open_transactions, timeout=30,
               what="t1 planned (it is now creating its image, 1.5 s)")
    with pytest.raises(grpc.RpcError) as err:
        host.cut("t2", [("vm1", "d1")])
    cutting.join(30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "t1" in (err.value.details() or "")
    assert first and first[0].frozen_at > 0
    host.thaw("t1")
    assert host.prepare("t1").yes
    host.commit("t1")


def test_an_agent_stopped_by_sigterm_thaws_its_guests_first(
    make_host: Callable[..., Host],
) -> None:
    """A service manager stops the agent (SIGTERM) while a guest is frozen: the agent
    thaws it before it exits, and never takes the watchdog away from a frozen guest."""
    host = make_host()
    ga = host.gas["vm1"]
    host.cut("t1", DISKS, freeze_timeout=60)
    assert ga.is_frozen and host.agent.proc is not None
    host.agent.proc.send_signal(signal.SIGTERM)
    host.agent.proc.wait(30)
    wait_until(lambda: not ga.is_frozen, timeout=5, what="thaw before exit")
    start, end = ga.frozen_intervals[-1]
    assert end - start < 30                       # long before the 60 s deadline
    host.start_agent()                            # restarted: the transaction votes NO
    assert not host.prepare("t1").yes
    host.abort("t1")
    assert_nothing_left(host, "t1")


def test_leftover_jobs_nodes_and_checkpoints_are_swept_and_committed_ones_kept(
    make_host: Callable[..., Host],
) -> None:
    """What a rollback could not remove (the VM was unreachable then) is swept when the
    agent (re)connects: a job of ours still copying, its target node, a stale
    checkpoint. The committed checkpoint and anything not ours stay."""
    host = make_host()
    write_clusters(host, range(0, 8))
    assert host.backup("t1", DISKS).yes
    host.qmp("vm1", "block-dirty-bitmap-add", {"node": "d1", "name": "blocktxn:ghost",
                                                "persistent": True})
    host.qmp("vm1", "block-dirty-bitmap-add", {"node": "d1", "name": "someone-elses"})
    host.qmp("vm1", "blockdev-add", {"driver": "null-co", "node-name": "btxghostnode",
                                     "size": 32 << 20})
    host.qmp("vm1", "blockdev-backup", {"job-id": "btxghostjob", "device": "d0",
                                        "target": "btxghostnode", "sync": "full",
                                        "speed": 4096, "auto-dismiss": False})
    assert [j["id"] for j in host.jobs("vm1")] == ["btxghostjob"]
    host.restart_agent()
    wait_until(lambda: host.jobs("vm1") == [], timeout=20, what="the sweep")
    nodes = {n["node-name"] for n in host.qmp("vm1", "query-named-block-nodes",
                                             {"flat": True})}
    assert "btxghostnode" not in nodes
    assert set(host.bitmaps("vm1", "d0")) == {"blocktxn:t1"}
    assert set(host.bitmaps("vm1", "d1")) == {"blocktxn:t1", "someone-elses"}
    assert host.backup("t2", DISKS).yes          # and the next backup is incremental


def running(host: Host) -> bool:
    return bool(host.qmp("vm1", "query-status")["running"])


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_paused_vm_is_resumed_at_its_deadline_whatever_happens_to_the_agent(
        make_host: Callable[..., Host], fault: str) -> None:
    """quiesce=pause has the same safety net as a freeze: the watchdog process, on a
    QMP monitor of its own, resumes the VM at the deadline while the agent is killed
    (no restart) or stopped; the transaction then votes NO and rolls back exactly."""
    host = make_host(system=True)
    write_clusters(host, range(0, 8))
    assert host.backup("t1", DISKS, quiesce=pb.QUIESCE_NONE).yes
    base = host.workloads["vm1"].seq
    cut = host.cut("t2", DISKS, quiesce=pb.QUIESCE_PAUSE, freeze_timeout=3.0)
    assert not running(host)
    assert host.agent.proc is not None
    if fault == "kill":
        host.kill_agent()
    else:
        host.agent.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: running(host), timeout=30, what="the watchdog's cont")
        assert time.time() < cut.freeze_deadline + 2.0 + 0.1  # the wait's own slack
    finally:
        if fault == "stop":
            host.agent.proc.send_signal(signal.SIGCONT)
    if fault == "kill":
        host.start_agent()
    else:
        assert host.thaw("t2").thawed_on_own
    vote = host.prepare("t2")
    assert not vote.yes
    write_clusters(host, range(3, 5))
    host.abort("t2")
    assert_nothing_left(host, "t2")
    assert_checkpoint_exact(host, "blocktxn:t1", base)
    assert running(host)


def test_pause_is_refused_without_a_watchdog_monitor(make_host: Callable[..., Host]) -> None:
    host = make_host()  # qemu-storage-daemon: no stop, no watch monitor
    with pytest.raises(grpc.RpcError) as err:
        host.cut("t1", DISKS, quiesce=pb.QUIESCE_PAUSE)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot pause" in (err.value.details() or "")
    assert host.jobs("vm1") == [] and set(host.bitmaps("vm1", "d0")) == set()


def assert_still_frozen_then_commits(host: Host, txn: str, why: str) -> None:
    """*txn*'s freeze still holds (no old watchdog ended it); the agent's own thaw ends
    it in time, and the transaction commits."""
    assert host.gas["vm1"].is_frozen, why
    assert not host.thaw(txn).thawed_on_own
    assert host.prepare(txn).yes
    host.commit(txn)


def test_the_watchdog_of_a_killed_agent_cannot_end_a_later_freeze(
    make_host: Callable[..., Host],
) -> None:
    """The agent is SIGKILLed while the guest is frozen; its restarted self thaws at
    once, but the old watchdog (it outlives the agent on purpose) is still armed. A
    later transaction's freeze of the same VM must not be ended by that old watchdog:
    it is refused while the old one is armed, and once the old one is gone a freeze
    holds (on the old code the later freeze was made, and the old watchdog thawed it at
    the first deadline). The first deadline is far enough for the restart to come well
    before it, however loaded the machine."""
    host = make_host()
    ga = host.gas["vm1"]
    host.cut("t1", DISKS, freeze_timeout=20)
    assert ga.is_frozen
    old = watchdog_pids(host)
    assert len(old) == 1
    host.restart_agent()
    wait_until(lambda: not ga.is_frozen, timeout=10, what="thaw after restart")
    host.abort("t1")
    assert alive(old[0])                        # armed until t1's deadline
    with pytest.raises(grpc.RpcError) as err:
        host.cut("t2", DISKS, freeze_timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    refused = err.value.details() or ""
    assert "vm1" in refused and "watchdog" in refused, refused
    assert not ga.is_frozen
    wait_until(lambda: not alive(old[0]), timeout=60, what="the old watchdog's exit")
    later = "t3"                                # the old one is gone: freezes work again
    host.cut(later, DISKS, freeze_timeout=60)
    assert_still_frozen_then_commits(host, later,
                                     "the later freeze was ended by the killed agent's watchdog")


def test_a_watchdog_still_retrying_a_failed_thaw_cannot_end_a_later_freeze(
    make_host: Callable[..., Host],
) -> None:
    """The agent's thaw fails, and the watchdog's thaw at the deadline is carried out
    by the guest agent only after the watchdog gave up waiting for it (it then
    retries). No later freeze of the VM may start within the watchdog's retry window,
    or that late thaw ends it early (on the old code the VM was released 1 s after the
    deadline, and the late thaw ended the next freeze)."""
    import threading

    host = make_host()
    ga = host.gas["vm1"]
    original = ga._dispatch
    thaws = [0]

    def dispatch(msg: dict[str, object]) -> dict[str, object] | None:
        if msg.get("execute") == "guest-fsfreeze-thaw":
            thaws[0] += 1
            if thaws[0] == 2:                     # the watchdog's first try is done late:
                time.sleep(6)                     # after the watchdog's 5 s timeout
        return original(msg)

    ga._dispatch = dispatch  # type: ignore[method-assign]
    first = host.cut("t1", DISKS, freeze_timeout=2)
    deadline = first.freeze_deadline
    ga.fail_thaws = 1                             # the agent's own thaw fails
    assert host.thaw("t1").thawed_on_own
    host.abort("t1")
    stop = time.time() + 60
    n, later = 2, ""
    while not later:                              # the next freeze, as soon as allowed
        try:
            host.cut(f"t{n}", DISKS, freeze_timeout=60)
            later = f"t{n}"
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "vm1" in (err.details() or "")
            assert time.time() < stop, err.details()
            n += 1
            threading.Event().wait(0.2)
    wait_until(lambda: time.time() > deadline + ENDING_WINDOW + 1, timeout=30,
               what="the end of the old watchdog's retries")
    assert_still_frozen_then_commits(host, later, "the later freeze was ended by the "
                                     "watchdog's retry of an old thaw")


def test_a_watchdog_that_does_not_acknowledge_its_deadline_is_replaced_unfrozen(
    make_host: Callable[..., Host],
) -> None:
    """A wedged watchdog (SIGSTOPped: its pipe is still open) does not acknowledge
    its arm: the agent does not freeze, the cut fails naming the VM, and the next cut
    gets a new watchdog (on the old code the arm line went into the pipe unread and
    the guest froze with no working watchdog). The refused cut's rollback leaves the
    guest's freeze state alone: here an operator's own freeze holds it, and stays."""
    host = make_host()
    ga = host.gas["vm1"]
    assert host.backup("t1", DISKS).yes
    [wedged] = watchdog_pids(host)
    os.kill(wedged, signal.SIGSTOP)
    try:
        ga._dispatch({"execute": "guest-fsfreeze-freeze"})      # the operator's freeze
        cuts, intervals = len(ga.cuts), list(ga.frozen_intervals)
        with pytest.raises(grpc.RpcError) as err:
            host.cut("t2", DISKS, freeze_timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = err.value.details() or ""
        assert "vm1" in details and "watchdog" in details, details
        assert len(ga.cuts) == cuts                     # never frozen without a watchdog
        assert ga.is_frozen and ga.frozen_intervals == intervals, "the operator's freeze ended"
        ga._dispatch({"execute": "guest-fsfreeze-thaw"})        # the operator's thaw
        assert_nothing_left(host, "t2")
        wait_until(lambda: not alive(wedged), timeout=10, what="the wedged watchdog's end")
        assert host.backup("t3", DISKS).yes
        assert len(ga.cuts) == cuts + 1 and not ga.is_frozen
        new = watchdog_pids(host)
        assert len(new) == 1 and new != [wedged]
    finally:
        if alive(wedged):
            os.kill(wedged, signal.SIGCONT)
