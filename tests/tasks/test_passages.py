"""Passages: a long turn becomes sentence windows, each a level-0 memory of the same turn, found by its
own words and packed on its own; short turns are left whole; a rerun changes nothing."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
from stage_data import answered_session

from memstage.tasks import scoring
from memstage.tasks.compress import run_compress
from memstage.tasks.index import run_index
from memstage.tasks.index_build import neighbour_links
from memstage.tasks.passages import SPLIT_WORDS, WINDOW_WORDS, split_turn, turn_of, windows
from memstage.tasks.retrieve import Retriever

TOPICS = ["gardening", "chess", "baking", "cycling", "astronomy", "pottery", "sailing", "knitting"]
FILLER = [
    f"Last year my neighbour talked for hours about {t} and the little club she runs on weekends."
    for t in TOPICS * 3
]
NEEDLE = "My cousin Ingrid bought a vintage accordion in Lisbon for 300 euros."
LONG = " ".join(FILLER[:12] + [NEEDLE] + FILLER[12:])


def test_windows_keep_every_word_once_and_short_turns_whole():
    parts = windows(LONG)
    assert len(parts) > 1
    assert " ".join(parts).split() == LONG.split()  # nothing lost, nothing repeated
    assert all(len(p.split()) <= WINDOW_WORDS for p in parts)
    assert any(NEEDLE in p for p in parts)  # whole sentences
    short = "I went to Lisbon. It was lovely."
    assert windows(short) == [short]
    one_sentence = " ".join(["word"] * (SPLIT_WORDS * 3))  # no sentence end: cut at word boundaries
    assert all(len(p.split()) <= WINDOW_WORDS for p in windows(one_sentence))


def test_split_turn_keeps_the_speaker_and_gives_the_caption_to_the_first():
    pairs = split_turn(f"assistant: {LONG} [shared an image: a photo of an accordion]")
    assert len(pairs) > 1
    assert all(text.startswith("assistant: ") for text, _ in pairs)
    assert pairs[0][0].endswith("[shared an image: a photo of an accordion]")
    assert not any("[shared an image" in text for text, _ in pairs[1:])
    assert not any("assistant:" in source or "shared an image" in source for _, source in pairs)
    assert split_turn("user: hello there") == [("user: hello there", "user: hello there")]
    assert turn_of("m0-abc#p03") == turn_of("m0-abc") == "m0-abc"


def test_passages_share_their_turns_neighbours():
    ids = ["m0-a", "m0-b", "m0-b#p02", "m0-b#p03", "m0-c", "m0-d", "m0-d#p02"]
    change = np.array([True, False, False, False, False, True, False])  # a session starts at 0 and 5
    links = neighbour_links(ids, change)
    assert links["prev"].tolist() == [-1, 0, 0, 0, 3, -1, -1]
    assert links["next"].tolist() == [1, 4, 4, 4, -1, -1, -1]


def test_a_turns_passages_are_scored_as_one_turn(monkeypatch):
    ids = ["m0-a", "m0-b", "m0-b#p02", "m0-b#p03", "m0-c", "m0-d", "m0-e", "m0-e#p02"]
    change = np.array([True, False, False, False, False, True, True, False])  # sessions at 0, 5, 6
    links = neighbour_links(ids, change)
    ns = SimpleNamespace(**links, session=np.cumsum(change) - 1)
    rows = np.arange(len(ids))
    turn = scoring.turn_groups(ns, rows)
    assert turn.tolist() == [0, 1, 1, 1, 2, 3, 4, 4]  # d and e: one-turn sessions, not one group
    base = np.array([0.0, 0.1, 2.0, 0.3, 0.0, 0.0, 1.0, 0.5])
    assert scoring.turn_max(turn, base).tolist() == [0.0, 2.0, 2.0, 2.0, 0.0, 0.0, 1.0, 1.0]
    # a short turn inherits its long neighbour's best passage, not the adjacent one (p03, 0.3)
    whole = scoring.turn_max(turn, base)
    assert scoring._neighbour(rows, ns.next, whole)[0] == 2.0
    assert scoring._neighbour(rows, ns.prev, whole)[4] == 2.0
    assert scoring._neighbour(rows, ns.prev, base)[4] == 0.3


def test_long_turn_is_passages_found_and_packed_alone(store, encoder, token_counter):
    turn = answered_session(store, "p", LONG, encoder, token_counter)
    assert turn["embedding"] is not None  # the whole turn's vector: no passage may inherit it
    first = run_compress(store, "p", count_tokens=token_counter.count_many, flow_run_id="run-1")
    assert first.figures["turns_split"] == 1
    mem = [m for m in store.memories("p", level=0).to_pylist() if turn_of(m["id"]) == turn["id"]]
    assert len(mem) == len(windows(LONG)) and {m["id"] for m in mem} >= {turn["id"]}
    for m in mem:  # every passage: a level-0 memory of the same turn, shorter than it
        assert m["event_ids"] == turn["event_ids"] and m["session"] == turn["session"]
        assert m["tokens"] < turn["tokens"] and m["embedding"] is None
        passage = json.loads(m["metadata"])["passage"]
        assert passage["n"] == len(mem) and passage["source"] in LONG
    ops = store.query("SELECT memory_id, action FROM ops WHERE stage = 'compress'").to_pylist()
    assert {(o["memory_id"], o["action"]) for o in ops} >= {(turn["id"], "update")}
    assert sum(o["action"] == "insert" for o in ops) == len(mem) - 1
    assert run_compress(store, "p", count_tokens=token_counter.count_many).changed == 0  # a rerun: no-op

    run_index(store, "p", embed=encoder.encode, count_tokens=token_counter.count_many)
    retriever = Retriever(store, encoder, token_counter)
    out = retriever.retrieve("p", "Where did Ingrid buy the accordion?", 120)
    assert out["tokens"] <= 120 and out["memories"], out
    best = next(m for m in out["memories"] if "Lisbon" in m["text"])  # the needle's passage, alone
    assert turn_of(best["memory_id"]) == turn["id"] and best["tokens"] < turn["tokens"]
    assert best["event_ids"] == turn["event_ids"]  # the pointer to the turn: credit is per turn
    scan = Retriever(store, encoder, token_counter, exhaustive=True)
    ranked = [i for i, _ in scan.rank("p", "Where did Ingrid buy the accordion?") if turn_of(i) == turn["id"]]
    assert ranked[0] == best["memory_id"]  # the passage saying it ranks above the turn's others
