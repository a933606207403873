"""When the agent takes its inventory again (agent/heartbeat.py ``_moved``): when a
transaction opens or ends, even one that opened and ended between two looks (its new
checkpoint must reach the coordinator), and when a VM connects or goes; not at the
steps in between (they change only what the coordinator does not keep)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from blocktxn.agent.heartbeat import _moved
from blocktxn.agent.participant_messages import Phase


def _runner(txns: dict[str, Phase], connected: bool = True) -> Any:
    return SimpleNamespace(
        machine=SimpleNamespace(txns={t: SimpleNamespace(phase=p) for t, p in txns.items()}),
        backends={"vm1": SimpleNamespace(connected=connected)})


def test_the_inventory_moves_when_a_transaction_opens_or_ends_not_at_its_steps() -> None:
    idle = _moved(_runner({}))
    cutting = _moved(_runner({"t1": Phase.CUTTING}))
    assert cutting != idle
    for step in (Phase.FROZEN, Phase.RUNNING, Phase.PREPARED, Phase.VOTED_NO):
        assert _moved(_runner({"t1": step})) == cutting
    committed = _moved(_runner({"t1": Phase.COMMITTED}))
    assert committed not in (cutting, idle)
    assert _moved(_runner({"t1": Phase.ABORTED})) == committed
    # t2 opened and ended between two looks: still a move
    assert _moved(_runner({"t1": Phase.COMMITTED, "t2": Phase.COMMITTED})) != committed
    assert _moved(_runner({}, connected=False)) != idle
