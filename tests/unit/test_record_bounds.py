"""A transaction's records stay within what one etcd request takes, whatever the texts
agents and QEMU send: every free text is cut by the size of its stored (escaped) JSON
form, and final_write_bound is an upper bound of the real final write (a review found
quotes and non-ASCII texts growing a write past its check)."""

from __future__ import annotations

import json
from dataclasses import replace

from blocktxn.coordinator.encoding import dump as _dump
from blocktxn.coordinator.encoding import final_write_bound, largest_value_bound
from blocktxn.coordinator.parts import requests, split_set, split_txn
from blocktxn.coordinator.records import (
    MAX_ERRORS,
    MemberRecord,
    SetImage,
    TxnRecord,
)
from blocktxn.coordinator.txn_machine import TxnMachine
from blocktxn.coordinator.txn_messages import Decision, TxnPhase
from blocktxn.requests import MAX_REASON, cut_text

NASTY = '"\\\u00e9\u2026\U0001f600\n'  # quote, backslash, non-ASCII, astral, newline


def test_cut_text_bounds_the_escaped_form() -> None:
    for bound in (3, 10, 160, 1024):
        for text in ("x" * 5000, NASTY * 500, "ok"):
            cut = cut_text(text, bound)
            fits = len(json.dumps(text)) - 2 <= bound
            assert cut == text if fits else (
                cut.endswith("...") and len(json.dumps(cut)) - 2 <= bound)
    assert cut_text("short", 160) == "short"


def test_the_bound_holds_for_the_worst_texts_agents_can_send() -> None:
    agents = [f"s{h:03d}" for h in range(100)]
    members = tuple(MemberRecord(a, f"vm{d // 2}", f"d{d % 2}", "auto")
                    for a in agents for d in range(10))
    record = TxnRecord("tx-20261203-080000-abcdef", "r-1", "grouped", "freeze", 10.0, 2e9,
                       0, 1e9, members, tuple((a, f"10.0.0.{i}:7401")
                                              for i, a in enumerate(agents)))
    bound = final_write_bound(record)
    machine = TxnMachine(record.txn_id, record.agent_ids, started=True,
                         phase=TxnPhase.DONE, decision=Decision.COMMIT,
                         committed=record.agent_ids, reason=NASTY * 1000)
    for p in machine.parts.values():
        p.vote, p.reason = True, NASTY * 1000
    for a in agents:  # every member cut with the nastiest reason
        record = record.with_members(a, lambda m: m.cut_as(
            "incremental", NASTY * 1000, 2 ** 63 - 1).prepared(2 ** 63 - 1).completed(
            "committed"))
    for _ in range(MAX_ERRORS + 5):
        record = record.with_error(NASTY * 1000)
    images = tuple(SetImage(m.agent_id, m.vm, m.disk,
                            f"images/{m.vm}/{m.disk}/{record.txn_id}.qcow2",
                            f"images/{m.vm}/{m.disk}/{record.txn_id}.qcow2", "incremental",
                            2 ** 63 - 1, 2 ** 63 - 1, "f" * 64, 1e9 + 0.123456789,
                            f"blocktxn:{record.txn_id}") for m in members)
    record = record.with_machine(machine).with_images(images)
    final = replace(record, set_id=record.txn_id)
    backup_set = final.backup_set(1e9 + 0.123456789)
    assert backup_set is not None
    # as the store writes it: each agent's parts, then both headers (coordinator/parts.py)
    header, parts = split_txn(final)
    set_header, set_parts = split_set(backup_set)
    items = [len(_dump(p)) for p in (*parts.values(), *set_parts.values())]
    real_size = max(requests(items, len(_dump(header)) + len(_dump(set_header)), 2))
    assert real_size <= bound, (real_size, bound)
    assert largest_value_bound(record) >= max(items)
    assert len(json.dumps(cut_text(NASTY * 1000, MAX_REASON))) - 2 <= MAX_REASON
