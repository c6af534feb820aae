"""Update: a changed fact supersedes the older memory; both stay queryable as of a date; nothing deleted."""

from __future__ import annotations

from datetime import UTC, datetime

from stage_data import ALICE, by_text, load

from memstage.tasks.update import extract_facts, memories_as_of, run_update


def test_fact_extraction_is_narrow():
    assert extract_facts("I live in Boston now and I work at Acme Robotics.") == [
        ("lives in", "boston"),
        ("works at", "acme robotics"),
    ]
    assert extract_facts("Big news: I moved to Seattle last month!") == [("lives in", "seattle")]
    assert extract_facts("My sister Carol lives in Denver.") == []  # not the speaker's fact
    assert extract_facts("Are you still at Acme Robotics?") == []
    assert extract_facts("I don't live in Paris.") == []
    assert extract_facts("I want to move to Rome.") == []
    assert extract_facts("We have 2 kids and I have three dogs.") == [("has count of kids", "2")]
    assert extract_facts("I have three dogs.") == [("has count of dogs", "3")]


def test_changed_facts_supersede(store, encoder, token_counter):
    load(store, "alice", ALICE, token_counter.count_many)
    before = store.query("SELECT count(*) AS n FROM memories").column("n")[0].as_py()
    r = run_update(store, "alice", embed=encoder.encode, flow_run_id="run-1")
    old = by_text(store, "alice", "live in Boston")[0]
    moved = by_text(store, "alice", "moved to Seattle")[0]
    job = by_text(store, "alice", "Blue Harbor")[0]
    assert old["superseded_by"] in (moved["id"], job["id"])
    assert old["valid_to"] == datetime(2023, 9, 10, 9, 0, tzinfo=UTC)
    assert moved["version"] == 2 and moved["valid_to"] is None
    assert r.figures["superseded"] == 2  # the city and the employer; Bob's sister's city is not Bob's
    assert store.query("SELECT count(*) AS n FROM memories").column("n")[0].as_py() == before
    ops = store.query("SELECT * FROM ops WHERE stage = 'update' AND action = 'supersede'").to_pylist()
    assert any("'boston' -> 'seattle'" in o["reason"] for o in ops)
    assert any("'acme robotics' -> 'blue harbor labs'" in o["reason"] for o in ops)
    # as of June the Boston memory was current; as of October the Seattle one is, and Boston is not
    june = {m["id"] for m in memories_as_of(store, "alice", datetime(2023, 6, 1, tzinfo=UTC)).to_pylist()}
    october = {m["id"] for m in memories_as_of(store, "alice", datetime(2023, 10, 1, tzinfo=UTC)).to_pylist()}
    assert old["id"] in june and moved["id"] not in june
    assert moved["id"] in october and old["id"] not in october
    assert run_update(store, "alice", embed=encoder.encode).changed == 0


def test_same_fact_repeated_is_not_a_change(store, encoder, token_counter):
    turns = [
        ("s1", "Dan", "I live in Lisbon with my cat.", "2023-01-01T10:00:00Z"),
        ("s2", "Dan", "I still live in Lisbon, it's lovely.", "2023-03-01T10:00:00Z"),
    ]
    load(store, "dan", turns, token_counter.count_many)
    assert run_update(store, "dan", embed=encoder.encode).changed == 0
