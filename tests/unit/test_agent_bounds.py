"""An agent that runs for a year: finished transactions, their locks and the journal
stay bounded however many transactions come and go."""

from __future__ import annotations

import asyncio
from pathlib import Path

from blocktxn.agent.config import AgentConfig
from blocktxn.agent.journal import KEEP_FINISHED
from blocktxn.agent.runner import AgentRunner


def test_finished_transactions_locks_and_journal_stay_bounded(tmp_path: Path) -> None:
    config = AgentConfig(agent_id="a1", listen="127.0.0.1:0", repo=tmp_path / "repo", vms=())

    async def scenario() -> None:
        runner = AgentRunner(config)
        await runner.start()
        try:
            for i in range(5 * KEEP_FINISHED):  # e.g. Aborts of ids never cut here
                await runner.abort(f"t{i}", "test")
            assert len(runner.machine.txns) <= 2 * KEEP_FINISHED
            assert len(runner._locks) <= 2 * KEEP_FINISHED
            lines = (config.repo / "journal.jsonl").read_bytes().count(b"\n")
            assert lines <= 2 * KEEP_FINISHED
            last = f"t{5 * KEEP_FINISHED - 1}"
            assert last in runner.machine.txns   # the newest are remembered
        finally:
            await runner.stop()
        again = AgentRunner(config)              # and the journal replays to the same
        await again.start()
        try:
            assert last in again.machine.txns
            assert len(again.machine.txns) <= 2 * KEEP_FINISHED
        finally:
            await again.stop()

    asyncio.run(scenario())
