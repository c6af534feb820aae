"""Topic windows: cuts fall where consecutive sentences' topic changes (a real MiniLM encoder), no word
is lost or repeated, passages keep to the size bounds, and the compress stage splits a long turn by
topic (the default) with the encoder the maintain flow gives it, and by fixed windows without one."""

from __future__ import annotations

import numpy as np
import pytest
from stage_data import load

from memstage.tasks import passages
from memstage.tasks.passages import _pieces, turn_of, windows
from memstage.tasks.registry import StageTools, get_stage
from memstage.tasks.topic_split import cuts, gap_similarity, topic_windows

GARDEN = [
    "I spent the whole morning weeding the tomato beds in the back garden.",
    "The tomato plants finally have green fruit after all that watering.",
    "Next week I will add compost and mulch around the tomato plants.",
    "The garden soil is still wet from the rain, so the weeds come out easily.",
    "My basil and parsley are growing well beside the tomatoes too.",
    "I think I will plant more herbs in the garden beds this spring.",
]
CHESS = [
    "At the chess club on Tuesday I lost with the black pieces in the Sicilian defence.",
    "My opponent sacrificed a knight and my king never found a safe square.",
    "I have been studying chess endgames with rooks and pawns every evening since.",
]
SAILING = [
    "On Sunday we took the small sailboat out across the harbour in strong wind.",
    "The boat heeled so far that water came over the side and we had to reef the sail.",
    "We tacked back to the marina and tied up at the dock before the storm.",
    "Sailing in that much wind was frightening but I want to go out on the boat again.",
]


def test_cuts_fall_at_the_dissimilar_gaps_and_respect_the_bounds():
    sizes = [10] * 9
    sims = np.array([0.9, 0.9, 0.1, 0.9, 0.9, 0.1, 0.9, 0.9])
    assert cuts(sizes, sims, max_words=80) == [0, 3, 6]
    assert all(np.diff([*cuts(sizes, sims, max_words=20), 9]) <= 2)  # never over max_words
    assert cuts(sizes, np.full(8, 0.5), max_words=100) == [0]  # no valley: one passage
    assert len(cuts(sizes, np.full(8, 0.5), max_words=80)) == 2  # unless it is too long
    assert cuts([50], np.zeros(0), max_words=20) == [0]  # one sentence: one passage, whatever its size
    with pytest.raises(ValueError):
        cuts(sizes, sims[:-1], max_words=80)


def test_gap_similarity_compares_the_blocks_around_each_gap():
    v = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    sims = gap_similarity(v, block=1)
    np.testing.assert_allclose(sims, [1.0, 0.0, 1.0], atol=1e-9)
    assert gap_similarity(v[:1]).shape == (0,)


def test_topic_windows_cut_where_the_topic_changes(encoder):
    pieces = GARDEN + CHESS + SAILING
    out = topic_windows(pieces, encoder.encode(pieces), max_words=80)
    assert " ".join(out).split() == " ".join(pieces).split()  # every word once, in order
    assert " ".join(CHESS) in out  # the chess remarks: a passage of their own
    assert all(len(p.split()) <= 80 for p in out)
    fixed = windows(" ".join(pieces))  # today's fixed windows mix the topics
    assert " ".join(CHESS) not in fixed


def test_the_compress_stage_splits_by_topic_with_its_encoder(store, encoder, token_counter, monkeypatch):
    body = " ".join(GARDEN + CHESS + SAILING)
    assert len(body.split()) > passages.SPLIT_WORDS
    turns = [("s1", "user", "How was your week?", "2023-05-01T10:00:00Z")]
    turns += [("s1", "assistant", body, "2023-05-01T10:01:00Z")]
    load(store, "t", turns, token_counter.count_many)
    assert passages.SPLIT_MODE == "topic"  # the default
    tools = StageTools(embed=encoder.encode, count_tokens=token_counter.count_many)
    result = get_stage("compress").run(store, "t", tools)  # as the maintain flow runs it
    assert result.figures["turns_split"] == 1
    turn = next(m for m in store.memories("t", level=0).to_pylist() if m["speaker"] == "assistant")
    mem = [m for m in store.memories("t", level=0).to_pylist() if turn_of(m["id"]) == turn_of(turn["id"])]
    sources = [passages.passage_source(m["metadata"])["source"] for m in sorted(mem, key=lambda m: m["id"])]
    assert sources == topic_windows(_pieces(body, 80), encoder.encode(_pieces(body, 80)), 80)
    assert " ".join(CHESS) in sources
    assert windows(body) != sources  # without an encoder: fixed windows
    monkeypatch.setattr(passages, "SPLIT_MODE", "fixed")
    assert windows(body, embed=encoder.encode) == windows(body)  # fixed mode ignores the encoder


def test_the_sentences_of_every_long_turn_are_embedded_in_one_call(encoder):
    calls = []

    def counted(texts):
        calls.append(len(texts))
        return encoder.encode(texts)

    turns = [
        f"assistant: {' '.join(GARDEN + CHESS + SAILING)}",
        f"user: {' '.join(SAILING + GARDEN + CHESS)}",
    ]
    turns.append("user: a short turn is not split")
    units = passages.units_of(
        [{"id": f"m{i}", "text": t, "metadata": None} for i, t in enumerate(turns)], counted
    )
    assert calls == [len(GARDEN + CHESS + SAILING)]  # one call, each distinct sentence once
    assert [u["_split"] for u in units].count(1) == 1 and len(units) > 3
    pieces = _pieces(" ".join(GARDEN + CHESS + SAILING), 80)
    one_by_one = topic_windows(pieces, encoder.encode(pieces), 80)
    assert [
        u["metadata"] and passages.passage_source(u["metadata"])["source"] for u in units[: len(one_by_one)]
    ] == one_by_one
    assert passages.batched(turns, None) is None
