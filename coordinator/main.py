"""Entry of the coordinator daemon (``blocktxn coordinator``, ``python -m
blocktxn.coordinator``): parse the configuration once, start a private etcd if no
endpoints are given, compose the replica and its gRPC service, run until signalled."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from blocktxn import daemon, metrics, tls
from blocktxn.access import parse_roles
from blocktxn.configfile import load_config_file
from blocktxn.ids import check_id

from . import upkeep
from .config import CoordinatorConfig, parse_retention
from .etcd_client import EtcdAccess
from .etcd_server import EtcdServer
from .metrics import CoordinatorMetrics
from .runner import Coordinator
from .schedule import MAX_SCHEDULES, Schedule, parse_schedule, parse_schedule_spec
from .service import serve
from .store import Store


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blocktxn coordinator",
                                description="Run a coordinator replica (CoordinatorService).")
    p.add_argument("--config", type=Path, help="TOML file with any of these options "
                   "(see deploy/coordinator.toml); flags given here override it")
    p.add_argument("--etcd", help="etcd endpoints host:port[,host:port...] "
                   "(default: start a private etcd under --data-dir)")
    p.add_argument("--etcd-ca", type=Path, help="TLS to etcd: verify its certificate "
                   "with this CA (with --etcd)")
    p.add_argument("--etcd-cert", type=Path, help="client certificate for etcd "
                   "(--client-cert-auth; with --etcd-key)")
    p.add_argument("--etcd-key", type=Path, help="key of --etcd-cert")
    p.add_argument("--etcd-user", help="etcd user (etcd auth enabled; with "
                   "--etcd-password-file)")
    p.add_argument("--etcd-password-file", type=Path,
                   help="file holding the etcd user's password (never on the command line)")
    p.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:7400)")
    p.add_argument("--advertise", help="address other replicas dial (default: --listen)")
    p.add_argument("--heartbeat-listen", metavar="HOST:PORT",
                   help="where agents' heartbeats are served, apart from transaction work "
                        "(default: --listen's host, any free port; port 0..65535)")
    p.add_argument("--name", help="replica name (a safe identifier; default coord1)")
    p.add_argument("--data-dir", type=Path,
                   help="where the private etcd keeps its data "
                   "(default /var/lib/blocktxn/coordinator)")
    p.add_argument("--retention", action="append", default=[],
                   metavar="GROUP=KEY=VALUE[,KEY=VALUE...]",
                   help="retention policy of a group of backup sets, e.g. "
                   "web=keep-last=5,keep-daily=7,keep-weekly=4,keep-within=2d; keys "
                   "keep-last/-hourly/-daily/-weekly/-monthly/-yearly (0..100000) and "
                   "keep-within (a duration such as 12h, 7d, 1y); repeatable")
    p.add_argument("--schedule", action="append", default=[],
                   metavar="NAME=cron=CRON;targets=T[,T...][;KEY=VALUE...]",
                   help="a scheduled backup, e.g. 'nightly=cron=0 3 * * *;targets=h1/web,"
                   "h2/db;quiesce=freeze;group=web'; keys cron (UTC; 5 fields, or 6 with "
                   "seconds last), targets, mode, quiesce, freeze-timeout, completion, group, "
                   "catch-up (how late a missed run may still start, 0..366d, default 1h), "
                   "webhook (URL), notify (abort|all); repeatable, or [schedule.NAME] "
                   "tables in --config")
    p.add_argument("--role", action="append", default=[], metavar="PATTERN=ROLE",
                   help="the role of the TLS client certificates whose identity (subject "
                   "CN, else first SAN) matches PATTERN (shell-style; first match wins): "
                   "reader, operator, agent (registers only as itself) or coordinator (the "
                   "other replicas); repeatable. Without any, every client the TLS CA "
                   "admits may do everything. Needs --tls-ca")
    p.add_argument("--keep-audit", help="how long an audit record stays in etcd (1s..3650d, "
                   "default 90d; at most the newest 100,000 are kept)")
    p.add_argument("--keep-finished", help="how long a finished transaction's record stays "
                   "in etcd, from its start: seconds or a duration like 12h, 7d (1s..3650d; "
                   "default 7d); backup sets stay")
    metrics.add_arguments(p)
    tls.add_arguments(p)
    tls.add_insecure_argument(p)
    return p


def config_from_args(args: argparse.Namespace) -> CoordinatorConfig:
    """Raises: ValueError on a bad value."""
    load_config_file(args, {"data_dir": Path, "tls_cert": Path, "tls_key": Path,
                            "tls_ca": Path, "etcd_ca": Path, "etcd_cert": Path,
                            "etcd_key": Path, "etcd_password_file": Path}, build_parser())
    args.listen = args.listen or "127.0.0.1:7400"
    args.name = args.name or "coord1"
    args.data_dir = args.data_dir or Path("/var/lib/blocktxn/coordinator")
    check_id(args.name, "replica name")
    retention = dict(parse_retention(spec) for spec in args.retention)
    if args.metrics_listen:
        metrics.parse_listen(args.metrics_listen)
    schedules = parse_schedules(args.schedule)
    keep_finished = upkeep.parse_keep(args.keep_finished or "7d")
    late = [s for s in schedules if s.catch_up > keep_finished]
    if late:
        raise ValueError(f"schedule {late[0].name!r}: catch-up {late[0].catch_up:g}s is longer "
                         f"than --keep-finished {keep_finished:g}s (a run's request id must "
                         "outlive its catch-up, or a late leader could start it again)")
    access = EtcdAccess(args.etcd_ca, args.etcd_cert, args.etcd_key, args.etcd_user or "",
                        args.etcd_password_file)
    if access != EtcdAccess() and not args.etcd:
        raise ValueError("--etcd-ca/-cert/-key/-user/-password-file are for an etcd given "
                         "with --etcd (the private etcd is plaintext on loopback)")
    access.check()
    roles = parse_roles(args.role)
    tls_files = tls.from_args(args)
    tls.check_listen(args.listen, tls_files, bool(args.insecure))
    if args.heartbeat_listen:
        host, sep, port = args.heartbeat_listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"--heartbeat-listen {args.heartbeat_listen!r} is not HOST:PORT "
                             "(port 0..65535)")
        tls.check_listen(args.heartbeat_listen, tls_files, bool(args.insecure))
    if roles.enforced and tls_files.ca is None:
        raise ValueError("--role needs mutual TLS (--tls-ca, --tls-cert, --tls-key): "
                         "identities come from client certificates")
    return CoordinatorConfig(name=args.name, listen=args.listen,
                             advertise=args.advertise or args.listen, etcd=args.etcd,
                             heartbeat_listen=args.heartbeat_listen,
                             data_dir=args.data_dir, tls=tls_files,
                             retention=retention,
                             keep_finished=keep_finished,
                             metrics_listen=args.metrics_listen, schedules=schedules,
                             etcd_access=access, roles=roles,
                             keep_audit=upkeep.parse_keep(args.keep_audit or "90d",
                                                          "--keep-audit"))


def parse_schedules(given: object) -> tuple[Schedule, ...]:
    """``--schedule`` specs, or the ``[schedule.NAME]`` tables of a config file.

    Raises: ValueError."""
    if isinstance(given, dict):
        for name, table in given.items():
            if not isinstance(table, dict):
                raise ValueError(f"config file: [schedule.{name}] is not a table")
        schedules = [parse_schedule(name, table) for name, table in given.items()]
    elif isinstance(given, list):
        schedules = [parse_schedule_spec(str(spec)) for spec in given]
    else:
        raise ValueError("schedule: a list of specs or [schedule.NAME] tables")
    names = [s.name for s in schedules]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"schedule {twice[0]!r} is given twice")
    if len(schedules) > MAX_SCHEDULES:
        raise ValueError(f"{len(schedules)} schedules: at most {MAX_SCHEDULES}")
    return tuple(schedules)


async def start(config: CoordinatorConfig) -> daemon.Stops:
    """Bring the replica up; return its stop hooks, in order."""
    replica_metrics = CoordinatorMetrics()
    stop_metrics = metrics.serve(config.metrics_listen, replica_metrics.registry, config.tls)
    etcd = None
    endpoints = config.etcd
    if endpoints is None:
        etcd = EtcdServer(config.data_dir)
        etcd.launch()  # from the event loop's thread: etcd dies with this process
        await asyncio.to_thread(etcd.wait_ready)
        endpoints = etcd.endpoint
    supervisor = asyncio.create_task(supervise(etcd)) if etcd is not None else None
    store = Store(endpoints, config.etcd_timeout, observe=replica_metrics.etcd_request,
                  access=config.etcd_access)
    coordinator = Coordinator(config, store, replica_metrics)
    health = upkeep.Health()
    server = await serve(coordinator, config.listen, config.tls, health)
    coordinator.start()
    stop_upkeep = upkeep.start(store, health, lambda: coordinator.election.epoch,
                               config.keep_finished, config.keep_audit)
    logging.getLogger(__name__).info("coordinator %s serving on %s (etcd %s)", config.name,
                                     config.listen, endpoints)

    async def stop_server() -> None:
        await server.stop(grace=2)

    async def stop_etcd() -> None:
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        if etcd is not None:
            etcd.stop()

    return [stop_server, stop_upkeep, coordinator.stop, store.close, stop_etcd, stop_metrics]


async def supervise(etcd: EtcdServer) -> None:
    """Restart the private etcd if it dies (same data directory and ports)."""
    log = logging.getLogger(__name__)
    while True:
        await asyncio.sleep(1.0)
        if etcd.proc is not None and etcd.proc.poll() is not None:
            log.warning("private etcd exited (%s); restarting it", etcd.proc.returncode)
            try:
                etcd.launch()
                await asyncio.to_thread(etcd.wait_ready)
            except (OSError, RuntimeError, TimeoutError) as err:
                log.error("private etcd did not restart: %s", err)


def main(argv: Sequence[str]) -> int:
    return daemon.main("coordinator", argv, build_parser(), config_from_args, start)
