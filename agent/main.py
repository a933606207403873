"""Entry of the agent daemon: parse the configuration once, run until signalled."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from agent.config import AgentConfig, parse_vm
from agent.runner import AgentRunner
from agent.service import serve
from blocktxn import tls
from blocktxn.configfile import load_config_file
from blocktxn.ids import IdentifierError, check_id


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML file with any of these options "
                   "(see deploy/agent.toml); flags given here override it")
    p.add_argument("--id", help="agent id (a safe identifier)")
    p.add_argument("--listen", help="HOST:PORT to serve AgentService on")
    p.add_argument("--repo", type=Path, help="backup repository directory")
    p.add_argument("--vm", action="append", default=[], metavar="NAME=QMP[,ga=GA]",
                   help="a VM: its QMP socket and optional guest-agent socket (repeatable)")
    p.add_argument("--restore-dir", action="append", default=[], type=Path,
                   help="directory restores may write into (repeatable; default REPO/restores)")
    p.add_argument("--coordinator",
                   help="HOST:PORT[,HOST:PORT...] of the coordinator replicas to register with")
    p.add_argument("--advertise", help="address the coordinator dials (default: --listen)")
    p.add_argument("--qmp-timeout", type=float, default=10.0, help="deadline of a QMP command")
    tls.add_arguments(p)


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """Raises: ValueError on a bad or missing value."""
    load_config_file(args, {"repo": Path, "restore_dir": Path, "tls_cert": Path,
                            "tls_key": Path, "tls_ca": Path})
    for name in ("id", "listen", "repo"):
        if not getattr(args, name):
            raise ValueError(f"--{name} is required (on the command line or in --config)")
    try:
        check_id(args.id, "agent id")
    except IdentifierError as err:
        raise ValueError(str(err)) from err
    vms = tuple(parse_vm(v) for v in args.vm)
    if len({v.name for v in vms}) != len(vms):
        raise ValueError("a VM name is given twice")
    return AgentConfig(
        agent_id=args.id, listen=args.listen, repo=args.repo, vms=vms,
        restore_dirs=tuple(args.restore_dir), coordinator=args.coordinator,
        advertise=args.advertise, qmp_timeout=args.qmp_timeout, tls=tls.from_args(args),
    )


async def run(config: AgentConfig) -> None:
    runner = AgentRunner(config)
    await runner.start()
    server = await serve(runner, config.listen, config.tls)
    heartbeat = None
    if config.coordinator:
        heartbeat = asyncio.create_task(register_forever(runner, config))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if heartbeat is not None:
        heartbeat.cancel()
    await server.stop(grace=2)
    await runner.stop()


async def register_forever(runner: AgentRunner, config: AgentConfig) -> None:
    """Announce this agent and its inventory to the coordinator, as a heartbeat."""
    import grpc

    from agent.service import inventory_to_pb
    from blocktxn.v1 import coordinator_pb2 as cpb
    from blocktxn.v1 import coordinator_pb2_grpc as cpb_grpc

    log = logging.getLogger(__name__)
    assert config.coordinator
    replicas = [a.strip() for a in config.coordinator.split(",") if a.strip()]
    channels = [config.tls.channel(a) for a in replicas]
    interval, turn = 3.0, 0
    while True:
        stub = cpb_grpc.CoordinatorServiceStub(channels[turn % len(channels)])
        try:
            reply = await stub.RegisterAgent(cpb.RegisterAgentRequest(
                agent_id=config.agent_id, address=config.advertise or config.listen,
                inventory=await inventory_to_pb(runner)), timeout=5)
            interval = reply.heartbeat_s or interval
        except grpc.aio.AioRpcError as err:
            log.warning("registration with %s failed: %s", replicas[turn % len(replicas)],
                        err.details() or err.code().name)
            interval, turn = 1.0, turn + 1
        await asyncio.sleep(interval)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent %(levelname)s %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"blocktxn agent: {err}")
        return 2
    asyncio.run(run(config))
    return 0
