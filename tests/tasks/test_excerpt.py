"""Excerpts: a long packed memory is cut to its sentences that share the question's words, counted
with the store's tokenizer, and says it is an excerpt; packing settles sizes before it reads them."""

from __future__ import annotations

import dataclasses

import numpy as np
from stage_data import answered_session

from memstage.settings import get_settings
from memstage.tasks import scoring, scoring_device
from memstage.tasks.excerpt import cut, density_order, sentences
from memstage.tasks.retrieve import Retriever, pack_sizes

FILLER = [
    "Last weekend my neighbour talked for hours about gardening and the club she runs.",
    "The weather was grey and the bus was late again, as it always is in autumn.",
    "We watched a long film about chess players in the old town square.",
    "Then we baked bread together and it came out far too salty for anyone.",
]
NEEDLE = "My cousin Ingrid bought a vintage accordion in Lisbon for 300 euros."
TURN = " ".join(FILLER[:2] + [NEEDLE] + FILLER[2:])  # 70 words: one memory, not split into passages


def test_cut_keeps_the_run_of_sentences_holding_the_question():
    s = sentences(f"assistant: {TURN}", 40)
    assert s.speaker == "assistant" and len(s.pieces) == 5 and s.words == len(TURN.split())
    # the needle with a sentence of context on each side (45 words allow three sentences)
    assert cut(s, {"accordion": 3.0, "ingrid": 2.0}, 45) == f"assistant: … {FILLER[1]} {NEEDLE} {FILLER[2]} …"
    # a run holding two of the question's words beats one holding one
    assert cut(s, {"accordion": 3.0, "bread": 2.5}, 40) == f"assistant: … {NEEDLE} {' '.join(FILLER[2:])}"
    assert cut(s, {"piano": 1.0}, 30) is None  # no sentence holds a question word: kept whole
    assert cut(s, {"accordion": 1.0}, 200) is None  # the run would be the whole text


def test_pack_sizes_settles_a_range_before_reading_it():
    sizes = np.array([60, 60, 60, 10], np.int64)
    asked = []

    def settle(lo: int, hi: int) -> None:
        asked.append((lo, min(hi, len(sizes))))
        sizes[1] = 20  # position 1 becomes an excerpt of 20 tokens

    picked, used = pack_sizes(sizes, 90, settle=settle)
    assert picked == [0, 1, 3] and used == 90
    assert asked[0] == (0, 1)


def test_retrieve_packs_the_excerpt_with_its_real_tokens(store, encoder, token_counter):
    whole = answered_session(store, "x", TURN, encoder, token_counter)
    question = "Where did Ingrid buy the accordion?"
    budget = whole["tokens"] - 5  # the whole memory cannot fit; its excerpt can
    today = Retriever(store, encoder, token_counter, excerpt_words=0).retrieve("x", question, budget)
    assert whole["id"] not in {m["memory_id"] for m in today["memories"]}

    cutter = Retriever(store, encoder, token_counter, excerpt_words=40)
    out = cutter.retrieve("x", question, budget)
    got = next(m for m in out["memories"] if m["memory_id"] == whole["id"])
    assert got["excerpt"] is True and "Lisbon" in got["text"] and "salty" not in got["text"]
    assert got["tokens"] == token_counter.count(got["text"]) < whole["tokens"] == got["full_tokens"]
    assert got["event_ids"] == whole["event_ids"] and got["session"] == whole["session"]
    assert out["tokens"] == sum(m["tokens"] for m in out["memories"]) <= budget
    assert all("excerpt" not in m for m in out["memories"] if m["memory_id"] != whole["id"])

    roomy = Retriever(store, encoder, token_counter, excerpt_words=0).retrieve("x", question, 1000)
    assert all("excerpt" not in m for m in roomy["memories"])  # off: every memory whole, as before
    assert Retriever(store, encoder, token_counter).excerpt_words == get_settings().excerpt_words

    # level 0 scored on a (CPU) torch device: the same packing code cuts the same excerpt
    on_device = dataclasses.replace(ns := cutter.load("x"), years=scoring.years_of(ns.days))
    on_device.device = scoring_device.device_level(on_device, "cpu")
    cutter._loaded["x"] = on_device
    again = cutter.retrieve("x", question, budget)
    assert cutter.last_figures == {"scored": on_device.n, "device": 1}
    assert [(m["memory_id"], m["text"], m["tokens"]) for m in again["memories"]] == [
        (m["memory_id"], m["text"], m["tokens"]) for m in out["memories"]
    ]


def test_density_order_lets_a_short_memory_pass_a_long_one_scored_just_above():
    levels, rows = np.zeros(3, np.int64), np.array([7, 8, 9])
    scores, sizes = np.array([10.0, 9.9, 9.0]), np.array([128, 20, 20])
    _, got, _, _ = density_order(levels, rows, scores, sizes, per_doubling=0.25)  # 128 tokens: -0.5
    assert got.tolist() == [8, 7, 9]
    _, same, _, _ = density_order(levels, rows, scores, sizes, per_doubling=0.0)
    assert same.tolist() == [7, 8, 9]
