"""Scheduled backups on a real cluster: each occurrence runs once, `blocktxn
schedules` shows next and last runs, the webhook hears each outcome (retried when it
fails), and a leader that dies right after starting an occurrence does not make the
next leader start it again."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from blocktxn.v1 import coordinator_pb2 as cpb
from tests.integration.cluster import Cluster
from tests.integration.harness import wait_until


class Webhook:
    """A local HTTP endpoint that fails its first *failures* POSTs with 500."""

    def __init__(self, failures: int = 1) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.attempts = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.attempts += 1
                if hook.attempts <= failures:
                    self.send_response(500)
                else:
                    hook.bodies.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def scheduled(cluster: Cluster) -> list[cpb.Transaction]:
    txns = cluster.any_stub().ListTransactions(cpb.ListTransactionsRequest(), timeout=10)
    return [t for t in txns.transactions if t.request_id.startswith("sched-")]


def cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blocktxn", "--coordinator",
                           cluster.coordinators[0].address, *args],
                          capture_output=True, text=True, timeout=60)


def test_each_occurrence_runs_once_and_the_webhook_hears_it(
    make_cluster: Callable[..., Cluster], webhook: Webhook,
) -> None:
    spec = f"every3=cron=* * * * * */3;targets=h1/vm1;notify=all;webhook={webhook.url}"
    cluster = make_cluster(1, coordinator_args=["--schedule", spec])
    cluster.add_host("h1", {"vm1": ["d0", "d1"]})
    cluster.wait_registered(1)
    wait_until(lambda: sum(t.decision == cpb.DECISION_COMMIT for t in scheduled(cluster)) >= 3,
               timeout=60, what="three committed scheduled runs")
    txns = scheduled(cluster)
    occurrences = Counter(int(t.request_id.rsplit("-", 1)[1]) for t in txns)
    assert set(occurrences.values()) == {1}, occurrences   # one transaction per occurrence
    assert all(at % 3 == 0 for at in occurrences)
    assert all(t.request_id.startswith("sched-every3-") for t in txns)

    listed = json.loads(cli(cluster, "schedules", "--json").stdout)
    (row,) = listed
    assert row["name"] == "every3" and row["targets"] == ["h1/vm1"]
    assert row["next_at"] > row["last_at"] > 0
    assert row["last_outcome"] in ("started", "refused")
    text = cli(cluster, "schedules")
    assert text.returncode == 0 and "every3" in text.stdout

    # the webhook: its first POST failed and was retried; every committed run is heard
    wait_until(lambda: {b["txn_id"] for b in webhook.bodies if b["outcome"] == "commit"}
               >= {t.txn_id for t in txns if t.decision == cpb.DECISION_COMMIT},
               timeout=60, what="a notification of every committed run")
    assert webhook.attempts > len(webhook.bodies)
    body = next(b for b in webhook.bodies if b["outcome"] == "commit")
    assert body["schedule"] == "every3" and body["set_id"] == body["txn_id"]
    assert {m["target"] for m in body["members"]} == {"h1/vm1/d0", "h1/vm1/d1"}
    assert body["duration_seconds"] >= 0 and body["scheduled_at"] % 3 == 0

    # a manual backup may not pose as a scheduled run
    bad = cli(cluster, "backup", "h1/vm1", "--request-id", "sched-every3-3")
    assert bad.returncode == 2 and "scheduler" in bad.stderr


def test_a_leader_dying_after_starting_a_run_does_not_run_it_twice(
    make_cluster: Callable[..., Cluster],
) -> None:
    # every 30 s: the next leader takes over (lease 5 s) before the next occurrence, so
    # the occurrence the first leader started is still the one due
    spec = "half=cron=* * * * * */30;targets=h1/vm1"
    cluster = make_cluster(2, first_env={"BLOCKTXN_FAILPOINTS": "schedule_started=exit"},
                           coordinator_args=["--schedule", spec])
    cluster.add_host("h1", {"vm1": ["d0"]})
    cluster.wait_registered(1)
    first = cluster.coordinators[0].proc
    assert first is not None
    # an occurrence before the agent registered is refused (no transaction, no failpoint):
    # the next one, 30 s on, is then the first started
    wait_until(lambda: first.poll() is not None, timeout=75,
               what="the first leader to die at the failpoint")
    (txn,) = scheduled(cluster)      # it started one transaction, then died
    occurrence = float(txn.request_id.rsplit("-", 1)[1])
    wait_until(lambda: cluster.leader() == 1, timeout=30, what="the second replica to lead")

    def last() -> dict[str, Any]:
        rows = cluster.stub(1).ListSchedules(cpb.ListSchedulesRequest(), timeout=10).schedules
        return {"at": rows[0].last_at, "txn": rows[0].last_txn_id,
                "outcome": rows[0].last_outcome}

    wait_until(lambda: last()["at"] == occurrence, timeout=30,
               what="the new leader to record the occurrence")
    assert last() == {"at": occurrence, "txn": txn.txn_id, "outcome": "started"}
    assert [t.txn_id for t in scheduled(cluster)] == [txn.txn_id]   # not started again
    assert cluster.wait_done(txn.txn_id).phase == cpb.TXN_PHASE_DONE
