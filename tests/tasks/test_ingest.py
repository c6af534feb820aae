"""Ingest: formats, validation into quarantine, content-hash dedup, and its properties (hypothesis)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memstage.tasks.ingest import IngestError, commit_events, detect_format, parse_file


def write_jsonl(path: Path, lines: list) -> Path:
    with path.open("wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
    return path


def good(i: int, ns: str = "alice") -> dict:
    return {
        "namespace": ns,
        "session": "s1",
        "speaker": "Al",
        "text": f"fact number {i}",
        "time": "2024-01-02T03:04:05Z",
    }


def test_sample_conversation_parses_with_times_and_sessions():
    events, bad = parse_file(SAMPLE, "auto")
    assert bad.num_rows == 0 and events.num_rows == 19
    first = events.to_pylist()[0]
    assert first["namespace"] == "demo" and first["session"] == "s1" and first["seq"] == 1
    assert first["event_time"].year == 2025


def test_locomo_conversations_become_namespaces_with_dia_ids_times_and_captions(locomo_path):
    events, bad = parse_file(locomo_path, "auto", namespace="dev")
    assert bad.num_rows == 0
    rows = [r for r in events.to_pylist() if r["namespace"] == "dev-conv-26"]
    meta = {json.loads(r["metadata"])["dia_id"]: (r, json.loads(r["metadata"])) for r in rows}
    row, m = meta["D1:3"]
    assert "LGBTQ support group" in row["text"] and row["speaker"] == "Caroline"
    assert row["event_time"].isoformat() == "2023-05-08T13:56:00+00:00"
    assert "blip_caption" in meta["D1:5"][1]
    assert sorted({r["namespace"] for r in events.to_pylist()}) == [
        "dev-conv-26",
        "dev-conv-30",
        "dev-conv-41",
        "dev-conv-42",
        "dev-conv-43",
    ]


def test_bad_records_are_quarantined_with_reasons_and_good_ones_still_land(store, tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            good(1),
            {"namespace": "alice", "speaker": "Al"},
            {"namespace": "alice", "text": 42},
            b'{"namespace": "alice", "text": "caf\xe9 latte"}\n',
            {"namespace": "alice", "text": "x" * 200_001},
            b"{not json}\n",
            {"namespace": "alice", "text": "when?", "time": "yesterday-ish"},
            {"namespace": "../evil", "text": "escape"},
            good(2),
        ],
    )
    events, bad = parse_file(path, "jsonl")
    result = commit_events(store, events, bad)
    assert result.figures["events_new"] == 2
    reasons = bad.column("reason").to_pylist()
    assert len(reasons) == 7
    for expected, no in [
        ("missing text", 2),
        ("text must be a string, got int", 3),
        ("invalid UTF-8", 4),
        ("exceeds the 100000-character limit", 5),
        ("invalid JSON", 6),
        ("unparsable time", 7),
        ("invalid namespace", 8),
    ]:
        assert any(f"record {no} of" in r and expected in r for r in reasons), (expected, reasons)
    assert store.counts()["quarantine"] == 7


def test_reingest_is_a_noop_and_keeps_stored_data(store, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [good(i) for i in range(5)])
    first = commit_events(store, *parse_file(path, "jsonl"))
    second = commit_events(store, *parse_file(path, "jsonl"))
    assert (first.changed, second.changed) == (5, 0)
    assert store.counts()["events"] == 5


def test_identical_lines_collapse_but_repeated_text_at_other_times_does_not(tmp_path):
    dup = good(1)
    later = {**good(1), "time": "2024-01-03T00:00:00Z"}
    events, _ = parse_file(write_jsonl(tmp_path / "d.jsonl", [dup, dup, later]), "jsonl")
    assert events.num_rows == 2


def test_parquet_input_and_namespace_default(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"session": "s", "speaker": "B", "text": "hello there", "time": None}]), path
    )
    events, bad = parse_file(path, "auto", namespace="bob")
    assert bad.num_rows == 0 and events.column("namespace").to_pylist() == ["bob"]


def test_unreadable_inputs_are_errors_not_crashes(tmp_path):
    with pytest.raises(IngestError, match="no such file"):
        parse_file(tmp_path / "missing.jsonl", "jsonl")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(IngestError, match="cannot tell the format"):
        detect_format(tmp_path / "x.csv")


record = st.one_of(
    st.builds(
        lambda t, s: {"namespace": "p", "session": s, "speaker": "A", "text": t},
        st.text(min_size=1, max_size=40).filter(
            lambda t: t.strip() and not any(0xD800 <= ord(c) <= 0xDFFF for c in t)
        ),
        st.sampled_from(["s1", "s2"]),
    ),
    st.just({"namespace": "p", "text": None}),
    st.just({"namespace": "p", "text": ["list"]}),
    st.just({"namespace": "p", "text": "   "}),
    st.just({"namespace": "p", "text": "ok", "metadata": "not an object"}),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(record, max_size=15))
def test_property_every_good_record_stored_every_bad_one_quarantined_reingest_noop(tmp_path_factory, records):
    from memstage.stores.store import MemoryStore

    tmp = tmp_path_factory.mktemp("prop")
    store = MemoryStore(tmp / "home")
    path = write_jsonl(tmp / "in.jsonl", records)
    events, bad = parse_file(path, "jsonl")

    def is_good(r: dict) -> bool:  # NULs are stripped before the emptiness check
        return (
            isinstance(r["text"], str) and bool(r["text"].replace("\x00", "").strip()) and "metadata" not in r
        )

    n_bad = sum(1 for r in records if not is_good(r))
    assert bad.num_rows == n_bad
    stored_texts = set(events.column("text").to_pylist())
    for r in records:
        if is_good(r):
            assert r["text"].replace("\x00", "").strip() in stored_texts
    commit_events(store, events, bad)
    before = store.counts()
    again = commit_events(store, *parse_file(path, "jsonl"))
    assert again.changed == 0 and store.counts() == before
