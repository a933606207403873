"""Retention across agents: policies applied after each committed backup of a group,
removals durable before any file changes and carried on by the next leader, every
kept set restoring bit-identical, bad input refused with nothing changed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from blocktxn import retention
from blocktxn.demo.lab import images_equal
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb
from tests.integration.cluster import Cluster
from tests.integration.harness import iter_files, wait_until
from tests.integration.test_coordinator import VMS, all_disks, two_hosts

TARGETS = ["h1/vm1", "h1/vm2", "h2/vm1", "h2/vm2"]
Cuts = dict[str, dict[tuple[str, str, str], Path]]  # set -> (agent, vm, disk) -> content


def backup(cluster: Cluster, cuts: Cuts, n: int, group: str = "web") -> str:
    """Writes, then one committed grouped backup (guests frozen: the stand-in guest
    agents keep each disk's content at the cut)."""
    for host in cluster.hosts.values():
        for vm, wl in host.workloads.items():
            for c in range(n * 2, n * 2 + 5):
                for d in VMS[vm]:
                    wl.write(d, c)
    txn = cluster.start(TARGETS, quiesce=apb.QUIESCE_FREEZE, group=group)
    done = cluster.wait_done(txn.txn_id)
    assert done.decision == cpb.DECISION_COMMIT, done.reason
    cuts[done.set_id] = {(h.agent.agent_id, vm, d): h.gas[vm].cuts[-1].images[d]
                         for h, vm, d in all_disks(cluster)}
    return done.set_id


def listed(cluster: Cluster) -> list[str]:
    return [s.set_id for s in cluster.any_stub().ListBackupSets(
        cpb.ListBackupSetsRequest(), timeout=10).sets]


def assert_restorable(cluster: Cluster, cuts: Cuts, kept: list[str]) -> None:
    stub = cluster.any_stub()
    for set_id in kept:
        for (agent, vm, disk), expected in cuts[set_id].items():
            out = cluster.hosts[agent].agent.restore_dir / f"{set_id}-{vm}-{disk}.raw"
            stub.Restore(cpb.CoordinatorRestoreRequest(
                set_id=set_id, target=f"{agent}/{vm}/{disk}", destination=str(out)),
                timeout=60)
            assert images_equal(out, "raw", expected, "raw"), (set_id, agent, vm, disk)
            out.unlink()
        assert stub.Verify(cpb.CoordinatorVerifyRequest(set_id=set_id), timeout=60).ok


def gone_everywhere(cluster: Cluster, kept: list[str]) -> bool:
    """Only the kept sets' images are in any catalog or on any disk."""
    for host in cluster.hosts.values():
        images = host.stub.ListImages(apb.ListImagesRequest(), timeout=10).images
        files = {str(p.relative_to(host.agent.repo))
                 for p in iter_files(host.agent.repo / "images")}
        if not {i.set_id for i in images} <= set(kept) or files != {i.image for i in images}:
            return False
    return True


def assert_gone_everywhere(cluster: Cluster, kept: list[str]) -> None:
    """The removal finishes (it runs in the background), and leaves only *kept*."""
    wait_until(lambda: gone_everywhere(cluster, kept), timeout=60, what="the removal")


def test_retention_runs_after_each_backup_and_keeps_every_kept_set_restorable(
        make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    clock = tmp_path / "clock"
    clock.write_text("0")
    policy = "keep-last=2,keep-daily=3"
    cluster = two_hosts(make_cluster, coordinator_args=["--retention", f"web={policy}"],
                        env={"BLOCKTXN_CLOCK_FILE": str(clock)})
    cuts: Cuts = {}
    times: dict[str, float] = {}
    for n in range(6):
        clock.write_text(str(n * 10 * 3600))  # ten hours between backups
        set_id = backup(cluster, cuts, n)
        times[set_id] = cluster.any_stub().GetBackupSet(
            cpb.GetBackupSetRequest(set_id=set_id), timeout=10).created_at
    disks = frozenset(f"{a}/{v}/{d}" for a, v, d in next(iter(cuts.values())))
    expected = [v.set_id for v in retention.plan(
        [retention.SetInfo(s, t, disks) for s, t in times.items()],
        retention.Policy.from_mapping({"keep-last": 2, "keep-daily": 3})) if v.keep]
    assert 2 < len(expected) < len(times)  # the policy removes some and keeps some
    wait_until(lambda: sorted(listed(cluster)) == sorted(expected), timeout=60,
               what="the automatic prune")
    assert_gone_everywhere(cluster, expected)
    assert_restorable(cluster, cuts, expected)
    newest = max(times, key=lambda s: times[s])
    for host, vm, disk in all_disks(cluster):  # checkpoints untouched by prune
        assert set(host.bitmaps(vm, disk)) == {f"blocktxn:{newest}"}
    dry = cluster.stub().PruneSets(cpb.PruneSetsRequest(group="web", dry_run=True), timeout=30)
    assert {v.set_id for v in dry.sets} == set(expected) and all(v.keep for v in dry.sets)
    assert any("daily" in r for v in dry.sets for r in v.reasons)
    more = backup(cluster, cuts, 7)  # the next incremental still holds every write
    assert_restorable(cluster, cuts, [more])


def test_forget_refuses_bad_input_and_changes_nothing(make_cluster: Callable[..., Cluster]
                                                     ) -> None:
    cluster = two_hosts(make_cluster, coordinator_args=["--retention", "web=keep-last=1"])
    cuts: Cuts = {}
    first, second = backup(cluster, cuts, 0), backup(cluster, cuts, 1, group="")
    stub = cluster.stub()
    for ids, code in (([first, "no-such-set"], grpc.StatusCode.NOT_FOUND),
                      ([second], grpc.StatusCode.FAILED_PRECONDITION),
                      (["../x"], grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as err:
            stub.ForgetSets(cpb.ForgetSetsRequest(set_ids=ids, wait=True), timeout=30)
        assert err.value.code() == code, err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.PruneSets(cpb.PruneSetsRequest(group="nope"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert listed(cluster) == [first, second]
    cli = [sys.executable, "-m", "blocktxn", "--coordinator", cluster.addresses]
    for argv in (["sets", "forget", "no-such-set"], ["sets", "prune", "--group", "nope"],
                 ["sets", "forget", second]):
        res = subprocess.run([*cli, *argv], capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res
    assert listed(cluster) == [first, second]
    res = subprocess.run([*cli, "sets", "forget", first, "--json"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert listed(cluster) == [second]
    assert_gone_everywhere(cluster, [second])
    assert_restorable(cluster, cuts, [second])


def test_a_removal_outlives_a_dead_agent_and_a_dead_leader(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = two_hosts(make_cluster, replicas=2)
    h1 = cluster.hosts["h1"]
    armed = h1.workdir / "failpoints"
    h1.agent.env = {"BLOCKTXN_FAILPOINT_FILE": str(armed)}
    h1.restart_agent()
    cluster.wait_registered(2)
    cuts: Cuts = {}
    sets = [backup(cluster, cuts, n, group="") for n in range(3)]
    armed.write_text("agent_after_delete=exit\n")
    result = cluster.stub().ForgetSets(cpb.ForgetSetsRequest(set_ids=[sets[1]]), timeout=30)
    assert result.prune_id and not result.done
    assert listed(cluster) == [sets[0], sets[2]]  # unlisted from the durable intent on
    assert h1.agent.proc is not None
    h1.agent.proc.wait(30)  # died half-way through its removal
    cluster.coordinators[0].kill()  # and so does the leader
    armed.unlink()
    h1.start_agent()
    stub = cluster.stub(1)

    def gone() -> bool:
        try:
            stub.GetBackupSet(cpb.GetBackupSetRequest(set_id=sets[1]), timeout=5)
        except grpc.RpcError as err:
            return "unknown" in (err.details() or "")
        return False

    wait_until(gone, timeout=90, what="the new leader to finish the removal")
    assert listed(cluster) == [sets[0], sets[2]]
    assert_gone_everywhere(cluster, [sets[0], sets[2]])
    assert_restorable(cluster, cuts, [sets[0], sets[2]])


def test_waiting_on_a_removal_already_under_way_waits_for_it(
        make_cluster: Callable[..., Cluster]) -> None:
    """Asking again for sets another prune is removing (or pruning a group while a
    removal of it runs) reports done only once they are gone: found by the chaos run,
    where a last `prune --wait` returned at once while a removal was still under way."""
    cluster = two_hosts(make_cluster, coordinator_args=["--retention", "web=keep-last=10"])
    h1 = cluster.hosts["h1"]
    armed = h1.workdir / "failpoints"
    h1.agent.env = {"BLOCKTXN_FAILPOINT_FILE": str(armed)}
    h1.restart_agent()
    cluster.wait_registered(2)
    cuts: Cuts = {}
    sets = [backup(cluster, cuts, n, group="web") for n in range(3)]
    armed.write_text("agent_after_delete=fail\n")  # h1's removal fails until disarmed
    first = cluster.stub().ForgetSets(cpb.ForgetSetsRequest(set_ids=[sets[0]]), timeout=30)
    assert first.prune_id and not first.done
    again = cluster.stub().ForgetSets(cpb.ForgetSetsRequest(set_ids=[sets[0]]), timeout=30)
    assert not again.done
    pruned = cluster.stub().PruneSets(cpb.PruneSetsRequest(group="web"), timeout=30)
    assert not pruned.done and not pruned.prune_id
    armed.unlink()
    again = cluster.stub().ForgetSets(cpb.ForgetSetsRequest(set_ids=[sets[0]], wait=True),
                                      timeout=120)
    assert again.done
    assert gone_everywhere(cluster, [sets[1], sets[2]])
    assert_restorable(cluster, cuts, [sets[1], sets[2]])
