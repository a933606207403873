"""The multi-seed mode's pure parts: the seed list and the aggregate table (no lab)."""

from __future__ import annotations

from tests.chaos.__main__ import parse_seeds, table
from tests.chaos.run import CUT_ONLY, FAULTS, PRUNE_STEPS, STEPS


def test_seed_lists() -> None:
    assert parse_seeds("1-4") == [1, 2, 3, 4]
    assert parse_seeds("3,5,9-11") == [3, 5, 9, 10, 11]
    assert parse_seeds("7") == [7]


def every_cell() -> list[list[object]]:
    return [[k, s, 1] for k in FAULTS
            for s in (("cut",) if k in CUT_ONLY else PRUNE_STEPS if k == "prune_crash"
                      else STEPS)]


def test_table_totals_and_violations() -> None:
    cells = every_cell()
    results = [
        {"seed": 1, "transactions": len(cells), "committed": 5, "refused": 1,
         "commit_refusals": 2, "faults": cells, "violations": []},
        {"seed": 2, "transactions": 3, "committed": 1, "refused": 0, "commit_refusals": 0,
         "faults": [["kill_agent", "late", 3]], "violations": ["tx-1: lost clusters [3]"]},
    ]
    out = table(results, [], 60)
    total = len(cells) + 3
    assert f"transactions: {total} (6 committed, {total - 6} aborted)" in out
    assert "fault kinds not hit at a step they apply to: none" in out
    assert "invariant violations: 1" in out
    assert "seed 2: tx-1: lost clusters [3]" in out
    row = next(line for line in out.splitlines() if line.startswith("kill_agent "))
    assert row.split()[1:] == ["1", "1", "1", "1", "0", "0", "3", "7"]  # 4+2 steps, late, total


def test_table_names_the_cells_never_hit() -> None:
    cells = [c for c in every_cell() if c[:2] != ["etcd_cut", "barrier"]]
    out = table([{"seed": 1, "transactions": len(cells), "committed": 0, "refused": 0,
                  "commit_refusals": 0, "faults": cells, "violations": []}], [4], 60)
    assert "fault kinds not hit at a step they apply to: etcd_cut@barrier" in out
    assert "runs that did not finish (no summary): seeds [4]" in out
