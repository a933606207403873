"""Entry of the coordinator daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from blocktxn import tls
from blocktxn.configfile import load_config_file
from blocktxn.ids import IdentifierError, check_id
from coordinator.config import CoordinatorConfig
from coordinator.etcd_server import EtcdServer
from coordinator.runner import Coordinator
from coordinator.service import serve
from coordinator.store import Store


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML file with any of these options "
                   "(see deploy/coordinator.toml); flags given here override it")
    p.add_argument("--etcd", help="etcd endpoints host:port[,host:port...] "
                   "(default: start a private etcd under --data-dir)")
    p.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:7400)")
    p.add_argument("--advertise", help="address other replicas dial (default: --listen)")
    p.add_argument("--name", help="replica name (a safe identifier; default coord1)")
    p.add_argument("--data-dir", type=Path,
                   help="where the private etcd keeps its data "
                   "(default /var/lib/blocktxn/coordinator)")
    tls.add_arguments(p)


def config_from_args(args: argparse.Namespace) -> CoordinatorConfig:
    """Raises: ValueError on a bad value."""
    load_config_file(args, {"data_dir": Path, "tls_cert": Path, "tls_key": Path,
                            "tls_ca": Path})
    args.listen = args.listen or "127.0.0.1:7400"
    args.name = args.name or "coord1"
    args.data_dir = args.data_dir or Path("/var/lib/blocktxn/coordinator")
    try:
        check_id(args.name, "replica name")
    except IdentifierError as err:
        raise ValueError(str(err)) from err
    return CoordinatorConfig(name=args.name, listen=args.listen,
                             advertise=args.advertise or args.listen, etcd=args.etcd,
                             data_dir=args.data_dir, tls=tls.from_args(args))


async def run(config: CoordinatorConfig) -> None:
    etcd = None
    endpoints = config.etcd
    if endpoints is None:
        etcd = EtcdServer(config.data_dir)
        await asyncio.to_thread(etcd.start)
        endpoints = etcd.endpoint
    supervisor = asyncio.create_task(supervise(etcd)) if etcd is not None else None
    store = Store(endpoints, config.etcd_timeout)
    coordinator = Coordinator(config, store)
    server = await serve(coordinator, config.listen, config.tls)
    coordinator.start()
    logging.getLogger(__name__).info("coordinator %s serving on %s (etcd %s)", config.name,
                                     config.listen, endpoints)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=2)
    await coordinator.stop()
    await store.close()
    if supervisor is not None:
        supervisor.cancel()
    if etcd is not None:
        etcd.stop()


async def supervise(etcd: EtcdServer) -> None:
    """Restart the private etcd if it dies (same data directory and ports)."""
    log = logging.getLogger(__name__)
    while True:
        await asyncio.sleep(1.0)
        if etcd.proc is not None and etcd.proc.poll() is not None:
            log.warning("private etcd exited (%s); restarting it", etcd.proc.returncode)
            try:
                await asyncio.to_thread(etcd.start)
            except (OSError, RuntimeError, TimeoutError) as err:
                log.error("private etcd did not restart: %s", err)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s coordinator %(levelname)s %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"blocktxn coordinator: {err}")
        return 2
    asyncio.run(run(config))
    return 0
