"""Compress: filler dropped, facts kept, pronouns and relative dates resolved, never longer, rerun a no-op."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
from stage_data import ALICE, by_text, load

from memstage.tasks.compress import absolute_time, compress_text, run_compress
from memstage.tasks.index import commit_embeddings, embeddings_table

WHEN = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)


def test_rules_on_single_texts():
    out = compress_text(
        "Melanie: Hey Caroline! Good to see you! I'm swamped with the kids & work. What's up with you? Anything new?",
        speaker="Melanie",
        other="Caroline",
        when=WHEN,
    )
    assert out == "Melanie is swamped with the kids & work."
    out = compress_text(
        "Caroline: I went to a LGBTQ support group yesterday and it was so powerful.",
        speaker="Caroline",
        other="Melanie",
        when=WHEN,
    )
    assert out.startswith("Caroline went to a LGBTQ support group yesterday (7 May 2023)")
    assert "so powerful" not in out
    out = compress_text(
        "Jon: Sorry about your job Gina. I ran 5 km in Paris last Saturday with my 2 dogs!",
        speaker="Jon",
        other="Gina",
        when=WHEN,
    )
    for fact in ("Gina's job", "5 km", "Paris", "2 dogs", "last Saturday (6 May 2023)"):
        assert fact in out, out


def test_absolute_times():
    assert absolute_time("last month", WHEN) == "April 2023"
    assert absolute_time("next year", WHEN) == "2024"
    assert absolute_time("two days ago", WHEN) == "6 May 2023"
    assert absolute_time("last week", WHEN) == "week before 8 May 2023"


def test_stage_compresses_once_and_keeps_originals(store, token_counter):
    load(store, "alice", ALICE, token_counter.count_many)
    ids = store.memories("alice", level=0).column("id").to_pylist()
    vectors = np.arange(len(ids) * 4, dtype=np.float32).reshape(len(ids), 4)  # stand-ins for embeddings
    commit_embeddings(store, "alice", embeddings_table(ids, vectors))
    before = {m["id"]: m for m in store.memories("alice", level=0).to_pylist()}
    first = run_compress(store, "alice", count_tokens=token_counter.count_many, flow_run_id="run-1")
    assert first.changed > 0
    assert first.figures["tokens_after"] < first.figures["tokens_before"]
    assert 0 < first.figures["ratio"] < 1
    after = {m["id"]: m for m in store.memories("alice", level=0).to_pylist()}
    for mid, m in after.items():
        assert m["tokens"] <= before[mid]["tokens"]  # never longer
        if m["text"] != before[mid]["text"]:
            # found by its source turn's text, unchanged: its embedding stays
            assert m["embedding"] == before[mid]["embedding"] is not None and m["event_ids"]
            assert json.loads(m["metadata"])["compressed"]["tokens_before"] == before[mid]["tokens"]
    filler = by_text(store, "alice", "Good to see", level=0)
    assert not filler or len(filler[0]["text"]) < len(ALICE[0][2])
    pixel = by_text(store, "alice", "Pixel yesterday")[0]
    assert "(30 April 2023)" in pixel["text"] and "3 years" in pixel["text"]
    # the original text: in events, and in the op's `before`
    events = store.events("alice").column("text").to_pylist()
    assert ALICE[3][2] in events
    ops = store.query("SELECT * FROM ops WHERE namespace = 'alice' AND stage = 'compress'").to_pylist()
    assert len(ops) == first.changed and all(o["flow_run_id"] == "run-1" for o in ops)
    assert any(ALICE[3][2] in json.loads(o["before"])["text"] for o in ops)
    second = run_compress(store, "alice", count_tokens=token_counter.count_many)
    assert second.changed == 0
    assert second.figures["level0_ratio"] == first.figures["level0_ratio"]
