"""Index stage: level-0 memories, embeddings, versioned per-level artifacts, idempotency."""

from __future__ import annotations

import json

from memstage.tasks.index import build_indexes, run_index
from memstage.tasks.ingest import commit_events, parse_file


def test_index_creates_one_memory_per_event_with_tokens_embeddings_and_ops(indexed_sample):
    mem = indexed_sample.memories("demo", level=0).to_pylist()
    assert len(mem) == 19
    assert all(m["tokens"] > 0 and len(m["embedding"]) == 384 and m["status"] == "active" for m in mem)
    assert all(m["text"].split(":")[0] in ("Maya", "Sam") for m in mem)
    ops = indexed_sample.query(
        "SELECT action, count(*) AS n FROM ops WHERE namespace = 'demo' GROUP BY 1"
    ).to_pylist()
    assert ops == [{"action": "insert", "n": 19}]


def test_index_artifacts_are_versioned_in_the_manifest_and_on_disk(indexed_sample):
    current = indexed_sample.current_indexes("demo").to_pylist()
    assert {(r["level"], r["kind"], r["version"]) for r in current} == {
        (0, "columns", 1),
        (0, "dense", 1),
        (0, "lexical", 1),
    }
    for r in current:
        assert (indexed_sample.home / r["path"]).exists()


def test_second_run_changes_nothing(indexed_sample, encoder, token_counter):
    again = run_index(indexed_sample, "demo", embed=encoder.encode, count_tokens=token_counter.count_many)
    assert again.changed == 0
    assert build_indexes(indexed_sample, "demo").changed == 0


def test_new_events_extend_the_index_as_a_new_version_and_old_files_go(
    indexed_sample, encoder, token_counter, tmp_path
):
    path = tmp_path / "more.jsonl"
    path.write_text(
        json.dumps({"namespace": "demo", "session": "s4", "speaker": "Sam", "text": "Pepper learned to sit."})
        + "\n"
    )
    commit_events(indexed_sample, *parse_file(path, "jsonl"))
    result = run_index(indexed_sample, "demo", embed=encoder.encode, count_tokens=token_counter.count_many)
    assert result.figures["level0_created"] == 1 and result.figures["embedded"] == 1
    current = indexed_sample.current_indexes("demo").to_pylist()
    assert {r["version"] for r in current} == {2} and all(r["count"] == 20 for r in current)
    assert sorted(p.name for p in indexed_sample.index_dir("demo").iterdir()) == ["v2"]
    files = sorted(p.name for p in (indexed_sample.index_dir("demo") / "v2").iterdir())
    assert "L0.rows.arrow" in files and "L0.dense.faiss" in files and "manifest.json" in files
