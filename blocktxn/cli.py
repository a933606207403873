"""The ``blocktxn`` command: daemons (agent, coordinator), the demo, and the
operator's commands. Exit codes: 0 success, 1 the transaction aborted (or a
verify failed), 2 bad input, 3 coordinator unreachable.

The daemons and the demo are named here by module only and imported when their
subcommand runs: an operator's command never loads QEMU's or etcd's client.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

EXIT_OK, EXIT_ABORTED, EXIT_BAD_INPUT, EXIT_UNREACHABLE = 0, 1, 2, 3

#: Subcommands that hand the rest of the command line to a module's ``main(argv) -> int``.
ENTRIES = {"agent": ("blocktxn.agent.main", "run the per-host agent"),
           "coordinator": ("blocktxn.coordinator.main", "run a coordinator replica"),
           "demo": ("blocktxn.demo.run", "run the self-contained demo cluster")}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _positive(kind: type[float] | type[int], most: float | None = None
              ) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text!r} is negative")
        if most is not None and not value <= most:
            raise argparse.ArgumentTypeError(f"{text!r} is more than {most:g}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from blocktxn import requests, tls

    parser = _Parser(prog="blocktxn", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = "HOST:PORT (default $BLOCKTXN_COORDINATOR, else 127.0.0.1:7400)"
    parser.add_argument("--coordinator", help=where)
    tls.add_arguments(parser, env=True)
    # the same options after the subcommand, as operators type them
    common = _Parser(add_help=False)
    common.add_argument("--coordinator", help=where, default=argparse.SUPPRESS)
    tls.add_arguments(common, env=True, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (_, text) in ENTRIES.items():
        entry = sub.add_parser(name, help=f"{text} (`blocktxn {name} --help`)", add_help=False)
        entry.add_argument("rest", nargs=argparse.REMAINDER)

    b = sub.add_parser("backup", parents=[common], help="back up targets as one transaction")
    b.add_argument("targets", nargs="+", metavar="TARGET", help="AGENT/VM or AGENT/VM/DISK")
    b.add_argument("--mode", choices=requests.MODES, default="auto")
    b.add_argument("--completion", choices=requests.COMPLETIONS, default="grouped")
    b.add_argument("--quiesce", choices=requests.QUIESCES, default="none")
    b.add_argument("--freeze-timeout", type=_positive(float), default=0.0, metavar="SECONDS",
                   help="0..3600, 0 = 10 s")
    b.add_argument("--deadline", type=_positive(float), default=0.0, metavar="SECONDS",
                   help="0..604800, 0 = 3600 s")
    b.add_argument("--speed", type=_positive(int), default=0, metavar="BYTES_PER_SEC",
                   help="per disk, 0 = unlimited")
    b.add_argument("--request-id", default="", help="idempotency key")
    b.add_argument("--group", default="", help="retention group the new set counts in "
                   "(its policy is the coordinator's --retention GROUP=...)")
    b.add_argument("--wait", action="store_true", help="follow progress until the decision")
    b.add_argument("--json", action="store_true")

    t = sub.add_parser("txn", help="transactions")
    tsub = t.add_subparsers(dest="txn_command", required=True, parser_class=_Parser)
    tl = tsub.add_parser("list", parents=[common])
    tl.add_argument("--open", action="store_true")
    tl.add_argument("--json", action="store_true")
    ts = tsub.add_parser("show", parents=[common])
    ts.add_argument("txn_id")
    ts.add_argument("--json", action="store_true")
    tc = tsub.add_parser("cancel", parents=[common])
    tc.add_argument("txn_id")
    tc.add_argument("--reason", default="cancelled by operator")
    tc.add_argument("--json", action="store_true")

    ag = sub.add_parser("agents", parents=[common], help="registered agents")
    ag.add_argument("--json", action="store_true")
    au = sub.add_parser("audit", parents=[common],
                        help="the audit trail: who backed up, cancelled, restored, pruned")
    au.add_argument("--since", default="1d", metavar="AGE|UNIXTIME",
                    help="records newer than this age (s, h, d, w: 12h, 7d) or unix time "
                    "(default 1d)")
    au.add_argument("--limit", type=_positive(int, 1000), default=100,
                    help="1..1000 (default 100)")
    au.add_argument("--json", action="store_true")
    sc = sub.add_parser("schedules", parents=[common],
                        help="scheduled backups: next run, last run and its outcome")
    sc.add_argument("--json", action="store_true")

    s = sub.add_parser("sets", help="backup sets")
    ssub = s.add_subparsers(dest="sets_command", required=True, parser_class=_Parser)
    sl = ssub.add_parser("list", parents=[common])
    sl.add_argument("--json", action="store_true")
    ss = ssub.add_parser("show", parents=[common])
    ss.add_argument("set_id")
    ss.add_argument("--json", action="store_true")
    sp = ssub.add_parser("prune", parents=[common],
                         help="apply retention policies: keep/remove each set, and why")
    sp.add_argument("--group", default="", help="one group (default: every group with a "
                    "policy)")
    sp.add_argument("--dry-run", action="store_true", help="only say what would go")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--wait", type=_positive(float, 86400), default=600.0, metavar="SECONDS",
                    help="wait this long for the removal, 0..86400 (default 600; "
                    "it carries on in the background after)")
    sf = ssub.add_parser("forget", parents=[common], help="remove chosen backup sets")
    sf.add_argument("set_ids", nargs="+", metavar="SET")
    sf.add_argument("--json", action="store_true")
    sf.add_argument("--wait", type=_positive(float, 86400), default=600.0, metavar="SECONDS",
                    help="as for prune")

    r = sub.add_parser("restore", parents=[common], help="restore one disk of a backup set")
    r.add_argument("set_id")
    r.add_argument("target", help="AGENT/VM/DISK")
    r.add_argument("--to", required=True, dest="destination", help="path on the agent's host")
    r.add_argument("--format", choices=["raw", "qcow2"], default="raw")
    r.add_argument("--json", action="store_true")

    v = sub.add_parser("verify", parents=[common],
                       help="verify every image chain of a backup set")
    v.add_argument("set_id")
    v.add_argument("--json", action="store_true")
    return parser


async def _backup(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from blocktxn.client import BackupOptions, Client
    from blocktxn.shapes import txn_json

    opts = BackupOptions(args.mode, args.completion, args.quiesce, args.freeze_timeout,
                         args.deadline, args.speed, args.request_id, args.group)
    async with Client(args.coordinator, tls=args.tls) as client:
        txn = await client.backup(args.targets, opts)
        if not args.wait:
            print(json.dumps(txn_json(txn)) if args.json else txn.txn_id)
            return EXIT_OK
        console = Console(stderr=True)
        if args.json:
            txn = await client.wait(txn.txn_id)
        else:
            with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                          TextColumn("{task.fields[status]}"), console=console,
                          transient=False) as progress:
                tasks: dict[str, Any] = {}
                async for update in client.watch(txn.txn_id):
                    for m in update.members:
                        key = f"{m.agent_id}/{m.vm}/{m.disk}"
                        if key not in tasks:
                            tasks[key] = progress.add_task(key, total=m.bytes_total or None,
                                                           status="")
                        progress.update(tasks[key], completed=m.bytes_done,
                                        total=m.bytes_total or None,
                                        status=m.outcome or m.job_status)
            txn = await client.get(txn.txn_id)
        summary = txn_json(txn)
        if args.json:
            print(json.dumps(summary))
        elif summary["state"] == "committed":
            print(f"{txn.txn_id} committed: backup set {txn.set_id}")
        else:
            print(f"{txn.txn_id} {summary['state']}: {txn.reason}")
        return EXIT_OK if summary["state"] == "committed" else EXIT_ABORTED


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*r)
    Console().print(table)


async def _removal(client: Any, args: argparse.Namespace) -> int:
    from blocktxn.shapes import prune_json

    if args.sets_command == "prune":
        result = await client.prune(args.group, args.dry_run, args.wait)
    else:
        result = await client.forget(args.set_ids, args.wait)
    if args.json:
        print(json.dumps(prune_json(result)))
        return EXIT_OK
    _table("backup sets", ["set", "group", "time", "verdict", "kept by"],
           [[v.set_id, v.group, _when(v.time), "keep" if v.keep else "remove",
             ", ".join(v.reasons)] for v in result.sets])
    removed = sum(1 for v in result.sets if not v.keep)
    if getattr(args, "dry_run", False):
        print(f"dry run: {removed} set(s) would be removed")
    elif result.prune_id:
        state = "removed" if result.done else "being removed in the background"
        print(f"{removed} set(s) {state} (prune {result.prune_id})")
    else:
        print("nothing to remove")
    return EXIT_OK


def _space(free: int, capacity: int) -> str:
    if not capacity:
        return "?"
    return f"{free / 2**30:.1f} of {capacity / 2**30:.1f} GiB free"


def _since(text: str) -> float:
    """``--since``: an age (``90s``, ``12h``, ``7d``, ``2w``) or a unix time.

    Raises: BadRequest."""
    from blocktxn.client import BadRequest

    units = {"s": 1, "h": 3600, "d": 86400, "w": 7 * 86400}
    try:
        if text[-1:] in units:
            return max(0.0, time.time() - float(text[:-1]) * units[text[-1]])
        return float(text)
    except ValueError:
        raise BadRequest(f"--since {text!r} is not an age (12h, 7d) or a unix time") from None


def _when(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


async def _operator(args: argparse.Namespace) -> int:
    from blocktxn.client import Client
    from blocktxn.shapes import (
        agent_json,
        audit_json,
        restore_json,
        schedule_json,
        set_json,
        txn_json,
        verify_json,
    )
    from blocktxn.wire import DECISION_NAME, MODE_NAME, PHASE_NAME

    async with Client(args.coordinator, tls=args.tls) as client:
        if args.command == "txn":
            if args.txn_command == "list":
                txns = await client.list_transactions(args.open)
                if args.json:
                    print(json.dumps([txn_json(t) for t in txns]))
                else:
                    _table("transactions", ["txn", "phase", "decision", "members", "reason"],
                           [[t.txn_id, PHASE_NAME[t.phase], DECISION_NAME[t.decision],
                             str(len(t.members)), t.reason] for t in txns])
                return EXIT_OK
            txn = await (client.get(args.txn_id) if args.txn_command == "show"
                         else client.cancel(args.txn_id, args.reason))
            if args.json:
                print(json.dumps(txn_json(txn)))
            else:
                print(f"{txn.txn_id}: {PHASE_NAME[txn.phase]} {DECISION_NAME[txn.decision]} "
                      f"{txn.reason}".rstrip())
                _table("members", ["target", "mode", "status", "bytes", "outcome"],
                       [[f"{m.agent_id}/{m.vm}/{m.disk}", MODE_NAME.get(m.mode) or "auto",
                         m.job_status, f"{m.bytes_done}/{m.bytes_total}", m.outcome]
                        for m in txn.members])
            return EXIT_OK
        if args.command == "agents":
            agents = await client.agents()
            if args.json:
                print(json.dumps([agent_json(a) for a in agents]))
            else:
                _table("agents", ["agent", "address", "state", "VMs", "disks", "repository"],
                       [[a.agent_id, a.address, "live" if a.live else "lost",
                         ", ".join(v.name for v in a.inventory.vms),
                         str(sum(len(v.disks) for v in a.inventory.vms)),
                         _space(a.inventory.repo_free, a.inventory.repo_capacity)]
                        for a in agents])
            return EXIT_OK
        if args.command == "audit":
            entries = await client.audit(_since(args.since), args.limit)
            if len(entries) == args.limit:
                print(f"blocktxn: the oldest {args.limit} records since {args.since}; "
                      "more with a later --since or a larger --limit", file=sys.stderr)
            if args.json:
                print(json.dumps([audit_json(e) for e in entries]))
            else:
                _table("audit", ["when", "who", "role", "call", "outcome", "request"],
                       [[_when(e.at), e.identity, e.role or "-", e.method,
                         e.code + (f": {e.detail}" if e.detail else ""), e.request[:120]]
                        for e in entries])
            return EXIT_OK
        if args.command == "schedules":
            schedules = await client.schedules()
            if args.json:
                print(json.dumps([schedule_json(s) for s in schedules]))
            else:
                _table("schedules", ["schedule", "cron (UTC)", "targets", "next run",
                                     "last run", "outcome", "transaction"],
                       [[s.name, s.cron, ", ".join(s.targets), _when(s.next_at),
                         _when(s.last_at) if s.last_at else "-",
                         " ".join(filter(None, (s.last_outcome, s.last_decision,
                                                s.last_reason)))[:80] or "-",
                         s.last_txn_id or "-"] for s in schedules])
            return EXIT_OK
        if args.command == "sets" and args.sets_command in ("prune", "forget"):
            return await _removal(client, args)
        if args.command == "sets":
            sets = [await client.set(args.set_id)] if args.sets_command == "show" \
                else await client.sets()
            if args.json:
                data = [set_json(s) for s in sets]
                print(json.dumps(data[0] if args.sets_command == "show" else data))
            else:
                _table("backup sets", ["set", "images", "bytes", "agents"],
                       [[s.set_id, str(len(s.images)), str(s.bytes), ", ".join(s.agents)]
                        for s in sets])
            return EXIT_OK
        if args.command == "restore":
            resp = await client.restore(args.set_id, args.target, args.destination, args.format)
            print(json.dumps(restore_json(resp)) if args.json else f"restored to {resp.path}")
            return EXIT_OK
        if args.command == "verify":
            result = await client.verify(args.set_id)
            if args.json:
                print(json.dumps(verify_json(args.set_id, result)))
            else:
                _table(f"verify {args.set_id}", ["image", "ok", "problem"],
                       [[c.image, "yes" if c.ok else "NO", c.problem] for c in result.checks])
            return EXIT_OK if result.ok else EXIT_ABORTED
    raise AssertionError(args.command)


def _client_call(args: argparse.Namespace, run: Callable[[argparse.Namespace], Awaitable[int]]
                 ) -> int:
    from blocktxn import tls
    from blocktxn.client import BadRequest, ClientError, Unreachable

    try:
        args.tls = tls.from_args(args, env=True)
    except ValueError as err:
        print(f"blocktxn: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return asyncio.run(run(args))  # type: ignore[arg-type]
    except BadRequest as err:
        print(f"blocktxn: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Unreachable as err:
        print(f"blocktxn: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ClientError as err:
        print(f"blocktxn: {err}", file=sys.stderr)
        return EXIT_ABORTED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ENTRIES:
        entry: Any = importlib.import_module(ENTRIES[argv[0]][0])
        try:
            return int(entry.main(argv[1:]))
        except SystemExit as exit_:
            return int(exit_.code or 0)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.command in ENTRIES:  # options before the subcommand: not for a daemon
        parser.error(f"give `blocktxn {args.command}` its options after the subcommand")
    if args.command == "backup":
        return _client_call(args, _backup)
    return _client_call(args, _operator)
