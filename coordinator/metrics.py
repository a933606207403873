"""The coordinator's Prometheus metrics.

Counted on the loop as things happen: transactions by outcome and abort reason class,
their duration and the cross-VM freeze window (first freeze to last thaw), bytes of
committed sets, elections won, and every etcd request's latency and errors. Read at
scrape time (from the HTTP thread, over a copy of the driver table): whether this replica
leads, and the transactions it drives now, by phase; the undecided ones, and those past
their deadline still undecided (both must return to 0)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from blocktxn import metrics

from .records import TxnRecord
from .txn_messages import OPEN, Decision

#: Seconds: an etcd request on loopback takes about a millisecond, past its 5 s
#: deadline it has failed.
ETCD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: The abort reasons the transaction machine writes, by the start of their text, and
#: the class each counts as (a bounded label: a reason's text is not).
_ABORT_CLASSES = (
    ("cancelled:", "cancelled"),
    ("cut failed on ", "cut_failed"),
    ("thaw on ", "thaw_failed"),
    ("every agent voted NO", "voted_no"),
    ("deadline passed", "deadline"),
    ("presumed abort", "deadline"),
    ("cut abandoned", "leader_changed"),
)
ABORT_CLASSES = frozenset({c for _, c in _ABORT_CLASSES} | {"voted_no", "other"})


def abort_class(reason: str) -> str:
    """The class of an abort *reason* (``other`` for a text the machine does not
    write)."""
    for start, cls in _ABORT_CLASSES:
        if reason.startswith(start):
            return cls
    if " voted NO: " in reason:
        return "voted_no"
    return "other"


class CoordinatorMetrics:
    """One replica's metrics, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or metrics.new_registry("coordinator")
        r = self.registry
        self.transactions = Counter(
            "blocktxn_transactions", "transactions this replica finished, by outcome "
            "(commit, abort) and abort reason class (none for a commit)",
            ["outcome", "reason"], registry=r)
        self.duration = Histogram(
            "blocktxn_transaction_duration_seconds", "start to final record of the "
            "transactions this replica finished", ["outcome"],
            buckets=metrics.DURATION_BUCKETS, registry=r)
        self.freeze = Histogram(
            "blocktxn_freeze_window_seconds", "first freeze to last thaw over all VMs of a "
            "quiesced transaction", buckets=metrics.DURATION_BUCKETS, registry=r)
        self.committed_bytes = Counter(
            "blocktxn_committed_bytes", "bytes of the images of committed backup sets",
            registry=r)
        self.elections = Counter(
            "blocktxn_coordinator_elections", "times this replica became the leader",
            registry=r)
        self.etcd = Histogram(
            "blocktxn_etcd_request_duration_seconds", "etcd requests by operation",
            ["operation"], buckets=ETCD_BUCKETS, registry=r)
        self.etcd_errors = Counter(
            "blocktxn_etcd_request_errors", "failed etcd requests by operation and kind "
            "(unavailable, rejected, full, cancelled)", ["operation", "kind"], registry=r)
        self.schedule_runs = Counter(
            "blocktxn_schedule_runs", "occurrences of each schedule this replica handled, "
            "by outcome (started, refused, missed)", ["schedule", "outcome"], registry=r)
        for outcome in ("commit", "abort"):
            self.duration.labels(outcome)
        self.transactions.labels("commit", "none")

    def watch(self, leads: Callable[[], bool], driven: Callable[[], list[TxnRecord]]) -> None:
        """Collect leadership and the transactions driven now at each scrape."""
        self.registry.register(_DriversCollector(leads, driven))

    def watch_schedules(self, next_runs: Callable[[], dict[str, float]]) -> None:
        """Collect each schedule's next occurrence at each scrape (on the leader)."""
        self.registry.register(_SchedulesCollector(next_runs))

    def etcd_request(self, operation: str, seconds: float, outcome: str) -> None:
        self.etcd.labels(operation).observe(seconds)
        if outcome != "ok":
            self.etcd_errors.labels(operation, outcome).inc()

    def finished(self, record: TxnRecord) -> None:
        """*record*'s final state is durable (its driver reached DONE here)."""
        outcome = "commit" if record.decision == Decision.COMMIT else "abort"
        reason = "none" if outcome == "commit" else abort_class(record.reason)
        self.transactions.labels(outcome, reason).inc()
        if record.created_at:
            self.duration.labels(outcome).observe(max(0.0, time.time() - record.created_at))
        if record.frozen_from and record.thawed_at >= record.frozen_from:
            self.freeze.observe(record.thawed_at - record.frozen_from)
        if outcome == "commit":
            self.committed_bytes.inc(sum(i.bytes for i in record.images))


class _DriversCollector:
    def __init__(self, leads: Callable[[], bool], driven: Callable[[], list[TxnRecord]]
                 ) -> None:
        self.leads, self.driven = leads, driven

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("blocktxn_coordinator_leader",
                                "1 if this replica is the leader", value=float(self.leads()))
        records = self.driven()
        by_phase = GaugeMetricFamily("blocktxn_transactions_open",
                                     "transactions this replica drives now, by phase",
                                     labels=["phase"])
        for phase in sorted(OPEN, key=lambda p: p.value):
            by_phase.add_metric([phase.value], sum(1 for r in records if r.phase == phase))
        yield by_phase
        undecided = [r for r in records if r.phase in OPEN and r.decision is None]
        yield GaugeMetricFamily("blocktxn_transactions_undecided",
                                "open transactions without a durable decision",
                                value=len(undecided))
        now = time.time()
        yield GaugeMetricFamily("blocktxn_transactions_undecided_past_deadline",
                                "undecided transactions whose deadline has passed "
                                "(the leader aborts them at once; stays above 0 only "
                                "while etcd or the leader cannot)",
                                value=sum(1 for r in undecided if r.deadline < now))


class _SchedulesCollector:
    def __init__(self, next_runs: Callable[[], dict[str, float]]) -> None:
        self.next_runs = next_runs

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("blocktxn_schedule_next_run_timestamp_seconds",
                                   "next occurrence of each schedule (on the leader only)",
                                   labels=["schedule"])
        for name, at in sorted(self.next_runs().items()):
            family.add_metric([name], at)
        yield family
