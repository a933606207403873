from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.integration.harness import Host

if TYPE_CHECKING:
    from tests.integration.cluster import Cluster
    from tests.integration.libvirt_lab import LibvirtHost
    from tests.integration.smallfs import SmallFs

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
def small_fs(tmp_path: Path) -> Iterator[SmallFs]:
    """A small loop-mounted ext4 file system, mounted by the test where it wants it;
    thawed and unmounted after (ask for it before the hosts, so that it is torn down
    after them)."""
    from tests.integration.smallfs import SmallFs

    for b in ("mkfs.ext4", "mount", "umount"):
        _require(b)
    fs = SmallFs(tmp_path / "small-fs.img")
    yield fs
    fs.close()


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


@pytest.fixture(scope="session")
def libvirt_daemons() -> Iterator[None]:
    """virtlogd and libvirtd, started for the session if not running (no systemd here);
    only what this fixture started is stopped after. Before that, the QEMU of any domain
    the tests created that still runs (libvirtd died, or a teardown's libvirt calls
    failed) is ended by its PID: libvirtd leaves its domains running when it stops."""
    from tests.integration.libvirt_lab import OWNED, LibvirtDaemons

    for b in ("libvirtd", "virtlogd", "qemu-system-x86_64"):
        _require(b)
    daemons = LibvirtDaemons()
    daemons.start()
    try:
        yield
    finally:
        try:
            OWNED.reap_all()
        finally:
            daemons.stop()


@pytest.fixture
def make_libvirt_host(tmp_path: Path, libvirt_daemons: None
                      ) -> Iterator[Callable[..., LibvirtHost]]:
    """Build lab hosts whose VMs are libvirt domains (+ a started agent); torn down after."""
    from tests.integration.libvirt_lab import LibvirtHost

    hosts: list[LibvirtHost] = []

    def make(vms: dict[str, list[str]] | None = None, start: bool = True,
             **kw: Any) -> LibvirtHost:
        host = LibvirtHost(tmp_path / f"lvhost{len(hosts)}", vms or {"vm1": ["vda", "vdb"]},
                           **kw)
        hosts.append(host)
        if start:
            host.start_agent()
        return host

    yield make
    for h in hosts:
        h.close()
