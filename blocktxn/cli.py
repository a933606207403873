"""The ``blocktxn`` command: daemons (agent, coordinator) and operator commands."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from agent import main as agent_main

    parser = argparse.ArgumentParser(prog="blocktxn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    agent_main.add_arguments(sub.add_parser("agent", help="run the per-host agent"))
    from coordinator import main as coordinator_main

    coordinator_main.add_arguments(sub.add_parser("coordinator", help="run a coordinator replica"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "agent":
        from agent import main as agent_main

        return agent_main.main(args)
    if args.command == "coordinator":
        from coordinator import main as coordinator_main

        return coordinator_main.main(args)
    parser.error(f"unknown command {args.command}")
    return 2
