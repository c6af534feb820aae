"""History: the supersession chain of a memory and every op on it."""

from __future__ import annotations

import pytest
from stage_data import ALICE, by_text, load

from memstage.tasks.compress import run_compress
from memstage.tasks.history import HistoryError, memory_history
from memstage.tasks.update import run_update


def test_history_of_a_changed_fact(store, encoder, token_counter):
    load(store, "alice", ALICE, token_counter.count_many)
    run_compress(store, "alice", count_tokens=token_counter.count_many)
    run_update(store, "alice", embed=encoder.encode)
    moved = by_text(store, "alice", "Seattle", level=0, speaker="Alice")[0]
    h = memory_history(store, moved["id"])
    assert h["namespace"] == "alice"
    ids = [v["id"] for v in h["versions"]]
    boston = [v for v in h["versions"] if "Boston" in v["text"]][0]
    assert ids.index(boston["id"]) < ids.index(moved["id"])  # older version first
    assert boston["superseded_by"] == moved["id"] and boston["valid_to"] is not None
    actions = {(o["stage"], o["action"]) for o in h["ops"]}
    assert {("index", "insert"), ("update", "supersede"), ("update", "version")} <= actions
    # the same chain from the older end
    assert [v["id"] for v in memory_history(store, boston["id"])["versions"]][:2] == ids[:2]
    with pytest.raises(HistoryError):
        memory_history(store, "m0-nope")
