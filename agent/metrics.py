"""The agent's Prometheus metrics.

Counted as the participant's events are recorded (``observe``, on the daemon's loop):
transactions by outcome, freeze windows, thaws the agent made on its own (its freeze
deadline passed, or the VM's watchdog did it), bytes copied, and the transactions and
block jobs open now (a PREPARED transaction is in doubt until its decision arrives: that
gauge must return to 0). Read at scrape time (from the HTTP thread; it reads only values
the loop replaces whole, never changes in place): the repository's capacity, free bytes
and catalog, per disk the recovery point of its newest committed backup (the metric an
alert on missed backups reads), and per disk of the last inventory whether it has none
(a disk never backed up has no recovery point to grow old: a second alert reads this)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from blocktxn import metrics

from .participant import TxnState
from .participant_messages import (
    OPEN_PHASES,
    Event,
    Phase,
    Prepared,
    Thawed,
)
from .repository import Repository


class AgentMetrics:
    """One agent's metrics, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or metrics.new_registry("agent")
        r = self.registry
        self.transactions = Counter(
            "blocktxn_agent_transactions", "transactions this agent finished, by outcome",
            ["outcome"], registry=r)
        self.freeze = Histogram(
            "blocktxn_agent_freeze_seconds", "how long this agent's VMs stayed quiesced "
            "(freeze or pause) in one transaction", buckets=metrics.DURATION_BUCKETS,
            registry=r)
        self.auto_thaws = Counter(
            "blocktxn_agent_auto_thaws", "thaws made without the coordinator: the freeze "
            "deadline passed (the agent's timer or a VM's watchdog)", registry=r)
        self.copied = Counter(
            "blocktxn_agent_copied_bytes", "bytes written into the repository by backup "
            "jobs that reached the prepare barrier", registry=r)
        self.open = Gauge(
            "blocktxn_agent_open_transactions", "transactions open on this agent, by phase "
            "(prepared: voted YES, decision not yet here)", ["phase"], registry=r)
        self.jobs = Gauge(
            "blocktxn_agent_backup_jobs", "disks of open transactions (one block job each "
            "from the cut to the decision)", registry=r)
        for phase in OPEN_PHASES:
            self.open.labels(phase.value).set(0)

    def watch(self, repo: Repository, vms_connected: Callable[[], Mapping[str, bool]],
              disks: Callable[[], Mapping[str, Sequence[str]]]) -> None:
        """Collect the repository and VM metrics at each scrape (*disks*: vm -> its
        disks, from the last inventory)."""
        self.registry.register(_RepositoryCollector(repo, vms_connected, disks))

    def observe(self, event: Event, old: Phase | None, st: TxnState | None,
                txns: Mapping[str, TxnState]) -> None:
        """*event* moved one transaction from phase *old* (None: new) to *st*;
        *txns* are all transactions now."""
        if isinstance(event, Thawed) and st is not None:
            if event.on_own:
                self.auto_thaws.inc()
            quiesced = st.plan is not None and st.plan.quiesce != "none"
            if quiesced and st.frozen_at and event.at >= st.frozen_at:
                self.freeze.observe(event.at - st.frozen_at)
        if isinstance(event, Prepared):
            self.copied.inc(sum(i.bytes for i in event.images))
        new = st.phase if st is not None else None
        if new != old and new in (Phase.COMMITTED, Phase.ABORTED):
            self.transactions.labels(new.value).inc()
        counts = dict.fromkeys(OPEN_PHASES, 0)
        jobs = 0
        for t in txns.values():
            if t.phase in OPEN_PHASES:
                counts[t.phase] += 1
                jobs += len(t.members)
        for phase, n in counts.items():
            self.open.labels(phase.value).set(n)
        self.jobs.set(jobs)


class _RepositoryCollector:
    def __init__(self, repo: Repository, vms_connected: Callable[[], Mapping[str, bool]],
                 disks: Callable[[], Mapping[str, Sequence[str]]]) -> None:
        self.repo, self.vms_connected, self.disks = repo, vms_connected, disks

    def collect(self) -> Iterator[Metric]:
        capacity, free = self.repo.space()
        yield GaugeMetricFamily("blocktxn_agent_repository_capacity_bytes",
                                "size of the repository's file system", value=capacity)
        yield GaugeMetricFamily("blocktxn_agent_repository_free_bytes",
                                "free bytes on the repository's file system", value=free)
        images = self.repo.images()  # one consistent list (the loop replaces it whole)
        yield GaugeMetricFamily("blocktxn_agent_repository_images",
                                "images in the catalog", value=len(images))
        yield GaugeMetricFamily("blocktxn_agent_repository_image_bytes",
                                "bytes of the catalog's images", value=sum(
                                    i.bytes for i in images))
        newest: dict[tuple[str, str, str], float] = {}
        for i in images:
            key = (i.vm, i.disk, i.mode)
            newest[key] = max(newest.get(key, 0.0), i.cut_at)
        last = GaugeMetricFamily(
            "blocktxn_last_backup_timestamp_seconds",
            "recovery point (cut time, unix seconds) of the newest committed backup of a "
            "disk, per mode (full, incremental)", labels=["vm", "disk", "mode"])
        for (vm, disk, mode), at in sorted(newest.items()):
            last.add_metric([vm, disk, mode], at)
        yield last
        backed_up = {(vm, disk) for vm, disk, _ in newest}
        none = GaugeMetricFamily(
            "blocktxn_agent_disk_without_backup",
            "1 if the disk (of the agent's last inventory) has no committed backup in this "
            "repository, else 0", labels=["vm", "disk"])
        for vm, names in sorted(self.disks().items()):
            for disk in names:
                none.add_metric([vm, disk], 0.0 if (vm, disk) in backed_up else 1.0)
        yield none
        up = GaugeMetricFamily("blocktxn_agent_vm_connected",
                               "1 if the agent is connected to the VM's monitor",
                               labels=["vm"])
        for vm, connected in sorted(self.vms_connected().items()):
            up.add_metric([vm], 1.0 if connected else 0.0)
        yield up
