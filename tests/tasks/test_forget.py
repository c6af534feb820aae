"""Forget: policies archive (undoably); hard forget removes a subject's text from every table, index and file."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from stage_data import ALICE, by_text, load

from memstage.stores.compact import find_bytes
from memstage.tasks.consolidate import run_consolidate
from memstage.tasks.forget import (
    ForgetError,
    forget_hard,
    forget_soft,
    load_policy,
    restore,
    run_forget,
    save_policy,
)
from memstage.tasks.index import run_index

NOW = datetime(2023, 9, 11, tzinfo=UTC)


def test_policy_defaults_and_file(store):
    assert load_policy(store, "alice")["capacity"] is None
    save_policy(store, "alice", {"capacity": 5})
    assert load_policy(store, "alice")["capacity"] == 5
    assert load_policy(store, "bob")["capacity"] is None  # per namespace
    assert json.loads((store.home / "policies.json").read_text())["namespaces"]["alice"] == {"capacity": 5}
    with pytest.raises(ForgetError):
        save_policy(store, "alice", {"capacitee": 5})


def test_default_policy_forgets_nothing(store, token_counter):
    load(store, "alice", ALICE, token_counter.count_many)
    assert run_forget(store, "alice", now=NOW).changed == 0


def test_capacity_archives_the_least_retained_and_restore_undoes(store, token_counter):
    load(store, "alice", ALICE, token_counter.count_many)
    save_policy(store, "alice", {"capacity": 8})
    r = run_forget(store, "alice", now=NOW, flow_run_id="run-1")
    assert r.changed == 4 and len(store.memories("alice", level=0)) == 8
    archived = store.memories("alice", level=0, status="archived").to_pylist()
    # the oldest (session s1, four months old) go first: retention decays with age
    assert all(m["session"] == "s1" for m in archived)
    assert run_forget(store, "alice", now=NOW).changed == 0  # idempotent
    back = restore(store, "alice", [archived[0]["id"]])
    assert back.changed == 1
    assert (
        run_forget(store, "alice", now=NOW).changed == 0
    )  # restored memories are pinned, so nothing re-archived


def test_ttl_and_access_strengthen(store, token_counter):
    load(store, "alice", ALICE, token_counter.count_many)
    save_policy(store, "alice", {"ttl_days": 30})
    r = run_forget(store, "alice", now=NOW)
    assert r.figures["archived"] == 7  # session s1 is older than 30 days
    assert {m["session"] for m in store.memories("alice", level=0).to_pylist()} == {"s2"}


def test_soft_forget_by_subject_is_undoable(store, token_counter):
    load(store, "alice", ALICE, token_counter.count_many)
    r = forget_soft(store, "alice", subject="pixel")
    assert r.changed == 4 and r.figures["undoable"]
    ids = [m["id"] for m in store.memories("alice", status="archived").to_pylist()]
    assert restore(store, "alice", ids).changed == 4


def test_hard_forget_subject_leaves_no_bytes(store, encoder, token_counter):
    load(store, "alice", ALICE, token_counter.count_many)
    load(store, "other", ALICE[:6], token_counter.count_many)  # the same subject in another namespace stays
    run_consolidate(store, "alice", embed=encoder.encode, count_tokens=token_counter.count_many)
    run_index(store, "alice", embed=encoder.encode, count_tokens=token_counter.count_many)
    assert find_bytes(store.home, "Pixel")
    r = forget_hard(store, "alice", subject="Pixel", embed=encoder.encode, flow_run_id="run-9")
    assert r.figures["undoable"] is False
    assert r.figures["events_deleted"] == 4 and r.figures["memories_deleted"] == 4
    assert r.figures["summaries_deleted"] >= 1  # the s1 session node quoted a Pixel turn or held its events
    assert r.figures["indexes"] == "rebuilt"
    # no table of the namespace mentions it; the ops say what was deleted, without the text
    for table, cols in {
        "events": ["text", "metadata"],
        "memories": ["text", "metadata"],
        "ops": ["before", "after", "reason"],
    }.items():
        for col in cols:
            n = store.query(
                f"SELECT count(*) AS n FROM {table} WHERE namespace = 'alice' AND {col} ILIKE '%pixel%'"
            )
            assert n.column("n")[0].as_py() == 0, (table, col)
    deletes = store.query("SELECT * FROM ops WHERE namespace='alice' AND action='delete'").to_pylist()
    assert len(deletes) >= 5 and all("NOT undoable" in d["reason"] for d in deletes)
    # the other namespace is untouched
    assert len(by_text(store, "other", "Pixel")) == 3
    # no file under the data dir has the bytes, except the other namespace's rows in the database
    with store.writer() as w:
        w.delete("events", "other", store.events("other").column("id").to_pylist())
        w.delete(
            "memories", "other", store.memories("other", status=None, current=False).column("id").to_pylist()
        )
        w.execute("DELETE FROM ops WHERE namespace = 'other'")
    from memstage.stores.compact import rewrite_database

    rewrite_database(store)
    assert find_bytes(store.home, "Pixel") == []
    # survivors keep working: the session node is rebuilt from what is left
    again = run_consolidate(store, "alice", embed=encoder.encode, count_tokens=token_counter.count_many)
    assert again.figures["level1_nodes"] == 2


def test_hard_forget_all_and_before(store, encoder, token_counter):
    load(store, "alice", ALICE, token_counter.count_many)
    r = forget_hard(store, "alice", before=datetime(2023, 6, 1, tzinfo=UTC))
    assert r.figures["events_deleted"] == 7
    assert {m["session"] for m in store.memories("alice", status=None, current=False).to_pylist()} == {"s2"}
    forget_hard(store, "alice", all=True)
    assert store.counts("alice")["events"] == 0 and store.counts("alice")["memories"] == 0
    with pytest.raises(ForgetError):
        forget_hard(store, "alice", subject="x")
    with pytest.raises(ForgetError):
        forget_hard(store, "alice")
