"""Metrics of both daemons, scraped by a real Prometheus from a real cluster (etcd, a
coordinator, two agents over QEMU): after a committed and an aborted transaction the
series say what happened, and the shipped alert rules load and evaluate."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blocktxn.demo.lab import free_port
from blocktxn.v1 import agent_pb2 as apb
from blocktxn.v1 import coordinator_pb2 as cpb
from tests.integration.cluster import Cluster
from tests.integration.pki import make_certs
from tests.integration.prometheus import RULES, PrometheusServer

VMS = {"vm1": ["d0", "d1"], "vm2": ["d0"]}
TARGETS = ["h1/vm1", "h1/vm2", "h2/vm1", "h2/vm2"]


@pytest.fixture
def make_prometheus(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    servers: list[PrometheusServer] = []

    def make(jobs: dict[str, list[str]],
             tls: dict[str, dict[str, str]] | None = None) -> PrometheusServer:
        server = PrometheusServer(tmp_path / f"prometheus{len(servers)}", jobs, tls)
        servers.append(server)
        server.start()
        return server

    yield make
    for s in servers:
        s.stop()


def one(result: dict[tuple[tuple[str, str], ...], float]) -> float:
    assert len(result) == 1, result
    return next(iter(result.values()))


def by(label: str, result: dict[tuple[tuple[str, str], ...], float]) -> dict[str, float]:
    return {dict(labels)[label]: value for labels, value in result.items()}


def test_prometheus_scrapes_what_a_commit_and_an_abort_did(
    make_cluster: Callable[..., Cluster],
    make_prometheus: Callable[..., PrometheusServer],
) -> None:
    coord = f"127.0.0.1:{free_port()}"
    agents = {h: f"127.0.0.1:{free_port()}" for h in ("h1", "h2")}
    cluster = make_cluster(1, coordinator_args=["--metrics-listen", coord])
    for h, address in agents.items():
        cluster.add_host(h, VMS, agent_args=["--metrics-listen", address],
                         read_error=("d1",) if h == "h2" else ())
    cluster.wait_registered(2)
    for host in cluster.hosts.values():
        for vm, wl in host.workloads.items():
            for c in range(8):
                for d in VMS[vm]:
                    wl.write(d, c)
    prom = make_prometheus({"blocktxn-coordinator": [coord],
                            "blocktxn-agent": list(agents.values())})
    # before any backup: every disk of every agent is known and has none
    disks = {(a, vm, d) for a in agents.values() for vm, ds in VMS.items() for d in ds}

    def without_backup(r: dict[tuple[tuple[str, str], ...], float]) -> dict[Any, float]:
        return {(x["instance"], x["vm"], x["disk"]): v for x, v in ((dict(k), v)
                                                                   for k, v in r.items())}

    prom.wait_for("blocktxn_agent_disk_without_backup",
                  lambda r: without_backup(r) == dict.fromkeys(disks, 1.0))

    good = cluster.wait_done(cluster.start(TARGETS, quiesce=apb.QUIESCE_FREEZE).txn_id)
    assert good.decision == cpb.DECISION_COMMIT, good.reason
    cluster.hosts["h2"].workloads["vm1"].arm_read_error("d1", 2)
    bad = cluster.wait_done(cluster.start(TARGETS, quiesce=apb.QUIESCE_FREEZE).txn_id)
    assert bad.decision == cpb.DECISION_ABORT and "voted NO" in bad.reason, bad.reason
    done_at = time.time()
    bset = cluster.stub().GetBackupSet(cpb.GetBackupSetRequest(set_id=good.set_id), timeout=10)

    # every target is up and Prometheus has scraped each one since both transactions
    # ended (every query below reads a scrape made after that)
    prom.wait_for("up", lambda r: len(r) == 3 and set(r.values()) == {1.0})
    prom.wait_for("timestamp(up)", lambda r: len(r) == 3 and min(r.values()) > done_at)
    outcomes = prom.wait_for("blocktxn_transactions_total", lambda r: sum(r.values()) == 2)
    assert {(dict(k)["outcome"], dict(k)["reason"]): v for k, v in outcomes.items()} == {
        ("commit", "none"): 1.0, ("abort", "voted_no"): 1.0}

    # per disk: the recovery point of its newest committed backup, exactly the cut
    last = prom.wait_for("blocktxn_last_backup_timestamp_seconds", lambda r: len(r) == 6)
    expected = {(agents[i.agent_id], i.vm, i.disk, "full"): i.cut_at for i in bset.images}
    got = {(d["instance"], d["vm"], d["disk"], d["mode"]): v
           for d, v in ((dict(k), v) for k, v in last.items())}
    assert got.keys() == expected.keys()
    for key, at in expected.items():
        assert got[key] == pytest.approx(at, abs=1e-6), key
    prom.wait_for("blocktxn_agent_disk_without_backup",
                  lambda r: without_backup(r) == dict.fromkeys(disks, 0.0))

    # nothing left undecided or open, on the coordinator or on any agent
    assert one(prom.query("blocktxn_transactions_undecided")) == 0
    assert one(prom.query("blocktxn_transactions_undecided_past_deadline")) == 0
    assert set(prom.query("blocktxn_transactions_open").values()) == {0.0}
    assert set(prom.query("blocktxn_agent_open_transactions").values()) == {0.0}
    assert set(prom.query("blocktxn_agent_backup_jobs").values()) == {0.0}
    per_agent = by("instance", prom.query("blocktxn_agent_transactions_total"
                                          '{outcome="committed"}'))
    assert per_agent == {a: 1.0 for a in agents.values()}
    per_agent = by("instance", prom.query('blocktxn_agent_transactions_total'
                                          '{outcome="aborted"}'))
    assert per_agent == {a: 1.0 for a in agents.values()}

    # both transactions froze every VM: one window each, on the coordinator and per agent
    assert one(prom.query("blocktxn_freeze_window_seconds_count")) == 2
    assert set(by("instance", prom.query("blocktxn_agent_freeze_seconds_count")).values()) \
        == {2.0}
    window = one(prom.query("blocktxn_freeze_window_seconds_sum"))
    assert 0 < max(prom.query("blocktxn_agent_freeze_seconds_sum").values()) <= window + 0.5
    assert one(prom.query("blocktxn_committed_bytes_total")) == bset.bytes
    for h, address in agents.items():
        mine = [i for i in bset.images if i.agent_id == h]
        copied = one(prom.query(f'blocktxn_agent_copied_bytes_total{{instance="{address}"}}'))
        assert copied >= sum(i.bytes for i in mine) > 0
        images = one(prom.query(f'blocktxn_agent_repository_images{{instance="{address}"}}'))
        assert images == len(mine)
        size = one(prom.query(f'blocktxn_agent_repository_image_bytes{{instance="{address}"}}'))
        assert size == sum(i.bytes for i in mine)
        free = one(prom.query(f'blocktxn_agent_repository_free_bytes{{instance="{address}"}}'))
        capacity = one(prom.query(
            f'blocktxn_agent_repository_capacity_bytes{{instance="{address}"}}'))
        assert 0 < free <= capacity
        connected = prom.query(f'blocktxn_agent_vm_connected{{instance="{address}"}}')
        assert by("vm", connected) == {"vm1": 1.0, "vm2": 1.0}

    # the replica leads, was elected once, and timed its etcd requests
    assert one(prom.query("blocktxn_coordinator_leader")) == 1
    assert one(prom.query("blocktxn_coordinator_elections_total")) == 1
    assert one(prom.query('blocktxn_etcd_request_duration_seconds_count'
                          '{operation="decide"}')) == 2
    assert one(prom.query('blocktxn_build_info{daemon="coordinator"}')) == 1
    assert min(prom.query("process_resident_memory_bytes").values()) > 0

    # the shipped alert rules are loaded and evaluate without error on these series
    rules = prom.evaluated_rules()
    assert {r["name"] for r in rules} >= {"BlocktxnBackupMissed", "BlocktxnNoLeader",
                                          "BlocktxnRepositoryAlmostFull"}
    assert all(r["health"] == "ok" for r in rules), rules
    firing = prom.query('ALERTS{alertstate="firing"}')
    assert not [k for k in firing if dict(k)["alertname"] in
                ("BlocktxnBackupMissed", "BlocktxnNoLeader", "BlocktxnTransactionUndecided")]


def test_alert_rules_check_and_pass_their_unit_tests() -> None:
    for argv in (["promtool", "check", "rules", RULES.name],
                 ["promtool", "test", "rules", "blocktxn-alerts.test.yml"]):
        done = subprocess.run(argv, cwd=RULES.parent, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("daemon", ["coordinator", "agent"])
def test_a_busy_or_bad_metrics_address_stops_the_daemon_with_one_line(
    tmp_path: Path, daemon: str,
) -> None:
    args = {"coordinator": ["--listen", f"127.0.0.1:{free_port()}", "--data-dir",
                            str(tmp_path / "data")],
            "agent": ["--id", "h9", "--listen", f"127.0.0.1:{free_port()}", "--repo",
                      str(tmp_path / "repo")]}[daemon]

    def run(metrics: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", f"blocktxn.{daemon}", *args,
                               "--metrics-listen", metrics],
                              capture_output=True, text=True, timeout=60)

    bad = run("localhost")
    assert bad.returncode == 2
    assert bad.stdout.strip() == (f"blocktxn {daemon}: --metrics-listen 'localhost' is not "
                                  "HOST:PORT (port 1..65535)")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run(f"127.0.0.1:{port}")
    assert done.returncode == 1
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "--metrics-listen" in lines[0] and "in use" in lines[0], lines
    # nothing was started: no private etcd, no repository
    assert not (tmp_path / "data" / "etcd").exists()
    assert not (tmp_path / "repo").exists()


def test_with_tls_the_endpoint_is_https_and_asks_for_a_client_certificate(
    tmp_path: Path, make_prometheus: Callable[..., PrometheusServer],
) -> None:
    """A daemon with --tls-cert/--tls-key/--tls-ca serves /metrics over HTTPS with its
    certificate and answers only scrapers with a certificate from its CA."""
    pki = make_certs(tmp_path / "pki", ["h9", "prometheus"])
    address = f"127.0.0.1:{free_port()}"
    agent = subprocess.Popen(
        [sys.executable, "-m", "blocktxn.agent", "--id", "h9", "--listen",
         f"127.0.0.1:{free_port()}", "--repo", str(tmp_path / "repo"),
         "--tls-cert", str(pki / "h9.crt"), "--tls-key", str(pki / "h9.key"),
         "--tls-ca", str(pki / "ca.crt"), "--metrics-listen", address],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    idle = socket.socket()
    try:
        # a client that connects and never shakes hands (a port scan, a TCP health
        # check) must not hold up the scrapes
        host, port = address.rsplit(":", 1)
        deadline = time.monotonic() + 30
        while True:
            try:
                idle.connect((host, int(port)))
                break
            except OSError:
                assert time.monotonic() < deadline, "the agent's metrics did not start"
                time.sleep(0.2)
        prom = make_prometheus({"blocktxn-agent": [address]}, tls={"blocktxn-agent": {
            "ca_file": str(pki / "ca.crt"), "cert_file": str(pki / "prometheus.crt"),
            "key_file": str(pki / "prometheus.key")}})
        up = prom.wait_for("up", lambda r: set(r.values()) == {1.0}, timeout=60)
        assert len(up) == 1
        assert one(prom.query('blocktxn_build_info{daemon="agent"}')) == 1
        # plain HTTP, and HTTPS without a client certificate, get no metrics
        with pytest.raises((OSError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read()
        anonymous = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        with pytest.raises((OSError, http.client.HTTPException)):
            urllib.request.urlopen(f"https://{address}/metrics", timeout=5,
                                   context=anonymous).read()
        known = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        known.load_cert_chain(str(pki / "prometheus.crt"), str(pki / "prometheus.key"))
        with urllib.request.urlopen(f"https://{address}/metrics", timeout=5,
                                    context=known) as reply:
            assert b"blocktxn_build_info" in reply.read()
    finally:
        idle.close()
        agent.terminate()
        agent.wait(30)
