"""Entry of the agent daemon (``blocktxn agent``, ``python -m blocktxn.agent``):
parse the configuration once, compose the runner, its gRPC service and the
heartbeat, run until signalled."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

from blocktxn import daemon, metrics, tls
from blocktxn.access import parse_roles
from blocktxn.configfile import load_config_file
from blocktxn.ids import check_id

from .config import STAGED_ALONE_AFTER, AgentConfig, parse_vm
from .heartbeat import register_forever
from .indoubt import resolve_in_doubt_forever
from .metrics import AgentMetrics
from .replicas import Replicas
from .runner import AgentRunner
from .service import serve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blocktxn agent",
                                description="Run the per-host agent (AgentService).")
    p.add_argument("--config", type=Path, help="TOML file with any of these options "
                   "(see deploy/agent.toml); flags given here override it")
    p.add_argument("--id", help="agent id (a safe identifier)")
    p.add_argument("--listen", help="HOST:PORT to serve AgentService on")
    p.add_argument("--repo", type=Path, help="backup repository directory")
    p.add_argument("--vm", action="append", default=[], metavar="NAME=QMP[,ga=GA]",
                   help="a VM: its QMP socket and optional guest-agent socket, or "
                   "NAME=libvirt:DOMAIN for a libvirt domain (repeatable)")
    p.add_argument("--libvirt-uri", default="qemu:///system",
                   help="libvirt connection URI of the libvirt:DOMAIN VMs "
                   "(default qemu:///system)")
    p.add_argument("--restore-dir", action="append", default=[], type=Path,
                   help="directory restores may write into (repeatable; default REPO/restores)")
    p.add_argument("--coordinator",
                   help="HOST:PORT[,HOST:PORT...] of the coordinator replicas to register with")
    p.add_argument("--advertise", help="address the coordinator dials (default: --listen)")
    p.add_argument("--qmp-timeout", type=float, default=10.0,
                   help="deadline of a QMP command, 0.1..3600 s (default 10)")
    p.add_argument("--in-doubt-after", type=float, default=30.0,
                   help="after voting, wait this long for the decision before asking the "
                   "coordinator for it, 1..86400 s (default 30)")
    p.add_argument("--staged-alone-after", type=float, default=STAGED_ALONE_AFTER,
                   help="a transaction staged here and never cut, about which no "
                   "coordinator replica answers, is rolled back after this long, "
                   "300..86400 s (default 900)")
    p.add_argument("--max-chain", type=int, default=32,
                   help="most images a disk's backup chain may have; an auto backup that "
                   "would make it longer is a full, 1..1000 (default 32)")
    p.add_argument("--role", action="append", default=[], metavar="PATTERN=coordinator",
                   help="only TLS clients whose certificate identity matches PATTERN (role "
                   "coordinator) may call the agent; repeatable; needs --tls-ca. Without "
                   "any, every client the TLS CA admits may")
    metrics.add_arguments(p)
    tls.add_arguments(p)
    tls.add_insecure_argument(p)
    return p


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """Raises: ValueError on a bad or missing value."""
    load_config_file(args, {"repo": Path, "restore_dir": Path, "tls_cert": Path,
                            "tls_key": Path, "tls_ca": Path}, build_parser())
    for name in ("id", "listen", "repo"):
        if not getattr(args, name):
            raise ValueError(f"--{name} is required (on the command line or in --config)")
    check_id(args.id, "agent id")
    if not 0.1 <= float(args.qmp_timeout) <= 3600:
        raise ValueError(f"--qmp-timeout {args.qmp_timeout} is not within 0.1..3600 s")
    if not 1 <= float(args.in_doubt_after) <= 86400:
        raise ValueError(f"--in-doubt-after {args.in_doubt_after} is not within 1..86400 s")
    if not 300 <= float(args.staged_alone_after) <= 86400:
        raise ValueError(f"--staged-alone-after {args.staged_alone_after} is not within "
                         "300..86400 s")
    if not 1 <= int(args.max_chain) <= 1000:
        raise ValueError(f"--max-chain {args.max_chain} is not within 1..1000")
    if args.metrics_listen:
        metrics.parse_listen(args.metrics_listen)
    roles = parse_roles(args.role)
    if any(role != "coordinator" for _, role in roles.entries):
        raise ValueError("--role: an agent only knows the role coordinator")
    tls_files = tls.from_args(args)
    tls.check_listen(args.listen, tls_files, bool(args.insecure))
    if roles.enforced and tls_files.ca is None:
        raise ValueError("--role needs mutual TLS (--tls-ca, --tls-cert, --tls-key)")
    vms = tuple(parse_vm(v) for v in args.vm)
    if len({v.name for v in vms}) != len(vms):
        raise ValueError("a VM name is given twice")
    return AgentConfig(
        agent_id=args.id, listen=args.listen, repo=args.repo, vms=vms,
        restore_dirs=tuple(args.restore_dir), coordinator=args.coordinator,
        advertise=args.advertise, qmp_timeout=args.qmp_timeout, tls=tls_files, roles=roles,
        in_doubt_after=float(args.in_doubt_after),
        staged_alone_after=float(args.staged_alone_after),
        max_chain=int(args.max_chain), metrics_listen=args.metrics_listen,
        libvirt_uri=args.libvirt_uri,
    )


async def start(config: AgentConfig) -> daemon.Stops:
    """Bring the agent up; return its stop hooks, in order."""
    agent_metrics = AgentMetrics()
    stop_metrics = metrics.serve(config.metrics_listen, agent_metrics.registry, config.tls)
    runner = AgentRunner(config, agent_metrics)
    await runner.start()
    server = await serve(runner, config.listen, config.tls)
    replicas = Replicas(config.coordinator, config.tls) if config.coordinator else None
    helpers = [asyncio.create_task(register_forever(runner, config, replicas)),
               asyncio.create_task(resolve_in_doubt_forever(runner, config.in_doubt_after,
                                                            replicas,
                                                            config.staged_alone_after))
               ] if replicas else []

    async def stop_heartbeat() -> None:
        for task in helpers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if replicas is not None:
            await replicas.close()

    async def stop_server() -> None:
        await server.stop(grace=2)

    return [stop_heartbeat, stop_server, runner.stop, stop_metrics]


def main(argv: Sequence[str]) -> int:
    return daemon.main("agent", argv, build_parser(), config_from_args, start)
