"""Session-diverse packing (`tasks.diversity`): the order by hand, the setting, and on a real store
(six sessions of a LoCoMo conversation, real encoder and tokenizer) the budget spread over more
sessions, with the index path, the exhaustive scan and the device path (torch on the CPU) packing
the same memories under the same spread."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import LOCOMO

from memstage.tasks import diversity

CONV = "conv-30"
SESSIONS = 6
SPREAD = 0.5


def test_spread_order_by_hand():
    scores = np.array([5.0, 4.9, 4.8, 3.0, 2.0])
    groups = np.array([7, 7, 7, 2, -1])  # -1: a node of level >= 1, a group of its own
    assert diversity.session_ranks(groups[:4]).tolist() == [0, 1, 2, 0]
    assert diversity.spread_order(scores, groups, 0.0).tolist() == [0, 1, 2, 3, 4]
    # lowered: 5, 3.9, 2.8, 3, 2 -> the other session's best row comes before the third of session 7
    assert diversity.spread_order(scores, groups, 1.0).tolist() == [0, 1, 3, 2, 4]
    lv, rows = np.array([0, 0, 1]), np.array([4, 5, 0])
    session = np.array([0, 0, 0, 0, 3, 3])
    assert diversity.session_groups(session, lv, rows).tolist() == [3, 3, -3]


def test_the_setting_overrides_the_default(monkeypatch):
    from memstage.settings import reload_settings

    monkeypatch.delenv("MEMSTAGE_SESSION_SPREAD", raising=False)
    reload_settings()
    assert diversity.session_spread() == diversity.SESSION_SPREAD
    monkeypatch.setenv("MEMSTAGE_SESSION_SPREAD", "0.3")
    reload_settings()
    assert diversity.session_spread() == 0.3
    for bad in ("-1", "abc", "inf", "nan"):
        monkeypatch.setenv("MEMSTAGE_SESSION_SPREAD", bad)
        with pytest.raises(ValueError, match="MEMSTAGE_SESSION_SPREAD"):
            reload_settings()


@pytest.fixture(scope="module")
def small(tmp_path_factory, encoder, token_counter):
    from memstage.stores.store import MemoryStore
    from memstage.tasks.consolidate import run_consolidate
    from memstage.tasks.index import build_indexes, run_index
    from memstage.tasks.ingest import commit_events, parse_file
    from memstage.tasks.retrieve import Retriever

    if not LOCOMO.exists():
        pytest.skip(f"LoCoMo data not found at {LOCOMO}")
    sample = next(s for s in json.loads(LOCOMO.read_text()) if s["sample_id"] == CONV)
    rows = [
        {"namespace": "small", "session": f"session_{n}", "time": f"2023-0{n}-10T10:00:00Z", **t}
        for n in range(1, SESSIONS + 1)
        for t in (
            {"speaker": x["speaker"], "text": x["text"]} for x in sample["conversation"][f"session_{n}"]
        )
    ]
    folder = tmp_path_factory.mktemp("diversity")
    (folder / "turns.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = MemoryStore(folder / "home")
    commit_events(store, *parse_file(folder / "turns.jsonl", "jsonl"))
    kw = {"embed": encoder.encode, "count_tokens": token_counter.count_many}
    run_index(store, "small", **kw)
    run_consolidate(store, "small", **kw)
    build_indexes(store, "small")
    questions = [q["question"] for q in sample["qa"] if q.get("category") in (1, 2, 3, 4)][:12]
    index = Retriever(store, encoder, token_counter)
    return index, Retriever(store, encoder, token_counter, exhaustive=True), questions


def packed(retriever, question, budget=400):
    return retriever.retrieve("small", question, budget)["memories"]


def test_the_spread_packs_more_sessions_out_of_score_order(small, monkeypatch):
    index, _, questions = small
    monkeypatch.setattr(diversity, "SESSION_SPREAD", 0.0)
    today = {q: packed(index, q) for q in questions}
    monkeypatch.setattr(diversity, "SESSION_SPREAD", SPREAD)
    spread = {q: packed(index, q) for q in questions}
    for q in questions:
        scores = [m["score"] for m in today[q]]
        assert scores == sorted(scores, reverse=True)  # spread 0: the scorer's order
        assert sum(m["tokens"] for m in spread[q]) <= 400
    sessions = {
        k: [len({m["session"] for m in got[q]}) for q in questions]
        for k, got in (("0", today), ("s", spread))
    }
    assert sum(sessions["s"]) > sum(sessions["0"])  # the budget reaches more sessions
    assert any(
        [m["score"] for m in spread[q]] != sorted((m["score"] for m in spread[q]), reverse=True)
        for q in questions
    )  # packed out of score order: the re-rank ran


def test_index_scan_and_device_pack_alike_under_the_spread(small, monkeypatch):
    from memstage.tasks import scoring, scoring_device

    index, scan, questions = small
    monkeypatch.setattr(diversity, "SESSION_SPREAD", SPREAD)
    for q in questions:
        for budget in (200, 1000):
            got = [m["memory_id"] for m in packed(index, q, budget)]
            assert got == [m["memory_id"] for m in packed(scan, q, budget)]
    ns = index.load("small")
    on_cpu = dataclasses.replace(ns, years=scoring.years_of(ns.days))
    on_cpu.device = scoring_device.device_level(on_cpu, "cpu")
    scan._loaded["small"] = on_cpu  # the scan's retriever now scores on the (CPU) device
    try:
        for q in questions[:6]:
            assert [m["memory_id"] for m in packed(scan, q, 500)] == [
                m["memory_id"] for m in packed(index, q, 500)
            ]
            assert scan.last_figures == {"scored": ns.n, "device": 1}
    finally:
        scan._loaded.pop("small")
