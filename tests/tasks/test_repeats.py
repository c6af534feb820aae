"""Repeats: a sentence already packed for a question is not packed again; a memory with nothing new is
skipped, one with some sentences packed goes in without them at its real token count."""

from __future__ import annotations

import dataclasses

import numpy as np
from stage_data import answered_session

from memstage.settings import Settings
from memstage.tasks import scoring, scoring_device
from memstage.tasks.packing import pack_sizes
from memstage.tasks.repeats import Repeats, sentence_keys
from memstage.tasks.retrieve import Retriever


class Words:
    """A token counter that counts words (the store's real counter is used in the retrieve test)."""

    def count(self, text: str) -> int:
        return len(text.split())


def test_sentence_keys_set_the_speaker_case_and_punctuation_aside():
    speaker, pieces, keys = sentence_keys(
        "assistant: Lisbon, in MAY! It's lovely... [shared an image: a tram]"
    )
    assert speaker == "assistant"
    assert keys[:2] == ["lisbon in may", "it's lovely"] and len(pieces) == len(keys) == 3
    assert keys[2].endswith("a tram")  # the image caption is a sentence of its own
    assert sentence_keys("user: Lisbon in may.")[2] == ["lisbon in may"]
    assert sentence_keys("🙂 !")[2] == []  # no word: nothing to compare


def test_admit_skips_what_adds_nothing_and_shortens_what_repeats():
    texts = [
        "user: I bought an accordion in Lisbon. It was 300 euros.",
        "user: I bought an accordion in Lisbon.  It was 300 EUROS!",  # every sentence packed
        "assistant: Wow. It was 300 euros. Lisbon is lovely in May.",  # one sentence packed
        "🙂",
        "🙂",  # no sentence: an exact copy is still skipped
        "user: Wow. It was 300 euros.",  # a short sentence alone is no news
        "user: Caroline! Wow.",  # nothing compared: packed unless an exact copy
    ]
    sizes = np.array([len(t.split()) for t in texts], np.int64)
    repeats = Repeats(texts.__getitem__, sizes, Words())
    picked, used = pack_sizes(sizes, 100, admit=repeats.admit)
    assert picked == [0, 2, 3, 6]
    assert repeats.made == {2: ("assistant: Wow. … Lisbon is lovely in May.", 8)}
    assert used == sizes[0] + 8 + 1 + 3 < sizes.sum()

    memories = [{"text": texts[j], "tokens": int(sizes[j])} for j in picked]
    repeats.mark(picked, memories)
    assert memories[1] == {"text": "assistant: Wow. … Lisbon is lovely in May.", "tokens": 8,
                           "excerpt": True, "full_tokens": 11}  # fmt: skip
    assert "excerpt" not in memories[0] and "excerpt" not in memories[2]

    # without a counter the whole size is scaled by the words kept, rounded up
    alone = Repeats(texts.__getitem__, np.array([10, 10, 20, 1, 1, 5, 3], np.int64), None)
    alone.admit(0)
    assert alone.admit(2) == 12  # 6 of the 10 words of its sentences are new: ceil(20 * 6 / 10)


def test_the_setting_reads_on_by_default_and_refuses_nonsense():
    assert Settings.from_env({}).drop_repeats is True
    assert Settings.from_env({"MEMSTAGE_DROP_REPEATS": "0"}).drop_repeats is False
    try:
        Settings.from_env({"MEMSTAGE_DROP_REPEATS": "maybe"})
    except ValueError as e:
        assert "MEMSTAGE_DROP_REPEATS" in str(e)
    else:
        raise AssertionError("a value that is not a switch was accepted")


QUESTION = "What did your cousin buy on the trip?"
ANSWER = f"{QUESTION} My cousin Ingrid bought a vintage accordion in Lisbon. It cost her 300 euros."


def test_retrieve_packs_no_sentence_twice(store, encoder, token_counter):
    answer = answered_session(store, "x", ANSWER, encoder, token_counter)
    asked = "What did Ingrid's cousin buy in Lisbon?"
    before = Retriever(store, encoder, token_counter, drop_repeats=False).retrieve("x", asked, 1000)
    assert _keys(before).count("what did your cousin buy on the trip") == 2  # off: packed twice

    dropping = Retriever(store, encoder, token_counter, drop_repeats=True)
    out = dropping.retrieve("x", asked, 1000)
    keys = _keys(out)
    assert len(keys) == len(set(keys)) and set(keys) == set(_keys(before))  # the same sentences, once
    assert out["tokens"] == sum(m["tokens"] for m in out["memories"]) < before["tokens"]
    short = [m for m in out["memories"] if m.get("excerpt")]
    if short:  # the question's turn ranked first: the answer goes in without the question
        (got,) = short
        assert got["memory_id"] == answer["id"] and got["full_tokens"] == answer["tokens"]
        assert got["tokens"] == token_counter.count(got["text"]) and got["text"].startswith("assistant: …")
    else:  # the answer ranked first: the question's own turn adds nothing
        assert len(out["memories"]) == len(before["memories"]) - 1

    # level 0 scored on a (CPU) torch device: the same packing leaves out the same sentences
    on_device = dataclasses.replace(ns := dropping.load("x"), years=scoring.years_of(ns.days))
    on_device.device = scoring_device.device_level(on_device, "cpu")
    dropping._loaded["x"] = on_device
    again = dropping.retrieve("x", asked, 1000)
    assert dropping.last_figures["device"] == 1
    assert [(m["memory_id"], m["text"], m["tokens"]) for m in again["memories"]] == [
        (m["memory_id"], m["text"], m["tokens"]) for m in out["memories"]
    ]


def _keys(result: dict) -> list[str]:
    return [k for m in result["memories"] for k in sentence_keys(m["text"])[2]]
