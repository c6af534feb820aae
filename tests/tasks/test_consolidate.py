"""Consolidate: near-duplicates merged (sources kept), one level-1 node per session, topics, rerun a no-op."""

from __future__ import annotations

import numpy as np
from stage_data import ALICE, by_text, load

from memstage.tasks.consolidate import find_duplicates, split_episodes
from memstage.tasks.consolidate import run_consolidate as consolidate


def test_near_duplicates_merge_into_the_earliest(store, encoder, token_counter):
    load(store, "alice", ALICE, token_counter.count_many)
    r = consolidate(
        store, "alice", embed=encoder.encode, count_tokens=token_counter.count_many, flow_run_id="run-1"
    )
    assert r.figures["merged_duplicates"] == 1
    walks = by_text(store, "alice", "long walks", level=0)
    survivor = [m for m in walks if m["status"] == "active"]
    archived = [m for m in walks if m["status"] == "archived"]
    assert len(survivor) == 1 and len(archived) == 1
    assert "every morning" in survivor[0]["text"]  # the earlier turn survives
    assert archived[0]["superseded_by"] == survivor[0]["id"]
    assert (
        set(archived[0]["event_ids"]) < set(survivor[0]["event_ids"]) and len(survivor[0]["event_ids"]) == 2
    )
    merge_ops = store.query("SELECT * FROM ops WHERE namespace='alice' AND action='merge'").to_pylist()
    assert {o["memory_id"] for o in merge_ops} == {survivor[0]["id"], archived[0]["id"]}


def test_session_nodes_link_children_and_rerun_is_noop(store, encoder, token_counter):
    load(store, "alice", ALICE, token_counter.count_many)
    r = consolidate(store, "alice", embed=encoder.encode, count_tokens=token_counter.count_many)
    l1 = store.memories("alice", level=1).to_pylist()
    assert len(l1) == 2 and r.figures["level1_nodes"] == 2
    assert {m["session"] for m in l1} == {"s1", "s2"}
    s1 = next(m for m in l1 if m["session"] == "s1")
    assert s1["text"].startswith("s1 (1 May 2023), Alice, Bob:")
    assert s1["embedding"] is not None and s1["tokens"] > 0
    children = [m for m in store.memories("alice", level=0).to_pylist() if m["session"] == "s1"]
    assert children and all(c["parent"] == s1["id"] for c in children)
    assert set(s1["event_ids"]) == {e for c in children for e in c["event_ids"]}
    again = consolidate(store, "alice", embed=encoder.encode, count_tokens=token_counter.count_many)
    assert again.changed == 0


def test_new_turns_replace_the_session_node_without_deleting(store, encoder, token_counter):
    load(store, "alice", ALICE[:5], token_counter.count_many)
    consolidate(store, "alice", embed=encoder.encode, count_tokens=token_counter.count_many)
    old = store.memories("alice", level=1).to_pylist()[0]
    load(store, "alice", ALICE, token_counter.count_many)
    consolidate(store, "alice", embed=encoder.encode, count_tokens=token_counter.count_many)
    stored = {m["id"]: m for m in store.memories("alice", level=1, status=None).to_pylist()}
    assert stored[old["id"]]["status"] == "archived"  # kept, not deleted
    assert sum(m["status"] == "active" for m in stored.values()) == 2


def test_episodes_and_duplicates_on_vectors():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=16), rng.normal(size=16)
    emb = np.stack(
        [a + 0.1 * rng.normal(size=16) for _ in range(30)]
        + [b + 0.1 * rng.normal(size=16) for _ in range(30)]
    )
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert split_episodes(emb) == [(0, 30), (30, 60)]
    assert split_episodes(emb[:20]) == [(0, 20)]
    mem = [{"id": f"m{i}", "speaker": "x", "event_time": None} for i in range(3)]
    vecs = np.stack([a, a, b]) / np.linalg.norm(np.stack([a, a, b]), axis=1, keepdims=True)
    assert find_duplicates(mem, vecs, 0.95) == {"m1": ("m0", 1.0)}
