from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.integration.harness import Host

if TYPE_CHECKING:
    from tests.integration.cluster import Cluster

pytestmark = pytest.mark.integration


def _require(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is not installed: run .ci/run or deploy/setup.sh first")


@pytest.fixture
def make_host(tmp_path: Path) -> Iterator[Callable[..., Host]]:
    """Build lab hosts (VMs + workloads + guest agents + a started agent); torn down after."""
    for b in ("qemu-storage-daemon", "qemu-img", "qemu-io"):
        _require(b)
    hosts: list[Host] = []

    def make(vms: dict[str, list[str]] | None = None, **kw: object) -> Host:
        host = Host(tmp_path / f"host{len(hosts)}", vms or {"vm1": ["d0", "d1"]}, **kw)  # type: ignore[arg-type]
        hosts.append(host)
        host.start_agent()
        return host

    yield make
    for h in hosts:
        h.close()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """etcd + coordinator replicas; hosts added by the test; all torn down after."""
    from tests.integration.cluster import Cluster

    for b in ("qemu-storage-daemon", "qemu-img", "qemu-io", "etcd"):
        _require(b)
    clusters: list[Cluster] = []

    def make(replicas: int = 1, first_env: dict[str, str] | None = None, **kw: Any
             ) -> Cluster:
        cluster = Cluster(tmp_path / f"cluster{len(clusters)}", replicas, first_env, **kw)
        clusters.append(cluster)
        return cluster

    yield make
    for c in clusters:
        c.close()
