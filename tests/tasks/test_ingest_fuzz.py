"""Hostile input fuzzing of the three readers (hypothesis): every record is stored or quarantined, never lost.

Each generated file mixes good records (unique texts) with hostile ones: nesting 20,000 deep,
integers of thousands of digits, 1e999, lone surrogates in every field, wrong types, binary junk,
timestamps outside Python's range. The run must complete, store every good record, quarantine only
hostile ones, and commit to a real DuckDB store.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memstage.stores.store import MemoryStore
from memstage.tasks.ingest import commit_events, parse_file

FUZZ = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
FIELDS = ["namespace", "session", "speaker", "text", "time", "seq", "metadata", "id"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def hostile_json_line(kind: str, depth: int, digits: int, field: str) -> str:
    """One hostile JSON Lines record as text (some cannot be made by json.dumps at all)."""
    base = '{"namespace": "fz", "speaker": "X", "text": "hostile"'
    if kind == "deep":
        return base + f', "{field}": ' + "[" * depth + "]" * depth + "}"
    if kind == "deep_object":
        return base + ', "metadata": ' + '{"a":' * depth + "1" + "}" * depth + "}"
    if kind == "bigint":
        return base + f', "{field}": ' + "9" * digits + "}"
    if kind == "bigfloat":
        return base + f', "{field}": 1e999, "x": -1e999}}'
    if kind == "surrogate":
        return base.replace('"hostile"', '"h"') + f', "{field}": "a\\ud800b"}}'
    if kind == "surrogate_text":
        return '{"namespace": "fz", "text": "lone \\udfff here"}'
    return "{" + "[" * depth  # truncated garbage


HOSTILE_LINE = st.builds(
    hostile_json_line,
    st.sampled_from(["deep", "deep_object", "bigint", "bigfloat", "surrogate", "surrogate_text", "junk"]),
    st.integers(900, 20_000),
    st.integers(19, 6_000),
    st.sampled_from(FIELDS),
)
RANDOM_RECORD = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6).map(
    lambda d: json.dumps(d, allow_nan=True)
)
JUNK_BYTES = st.binary(min_size=1, max_size=50).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" "))


def good_record(i: int) -> dict:
    return {
        "namespace": "fz",
        "session": "s1",
        "speaker": "Ann",
        "text": f"good turn number {i} of the fuzz run",
    }


def check_outcome(path: Path, fmt: str, n_records: int, good_nos: set[int], good_texts: set[str]) -> None:
    events, bad = parse_file(path, fmt, namespace="fz" if fmt != "locomo" else None)
    quarantined = bad.column("record_no").to_pylist()
    assert len(set(quarantined)) == len(quarantined), "a record quarantined twice"
    assert not set(quarantined) & good_nos, f"good records quarantined: {set(quarantined) & good_nos}"
    assert set(quarantined) <= set(range(1, n_records + 1))
    stored = set(events.column("text").to_pylist())
    assert good_texts <= stored, f"good records lost: {sorted(good_texts - stored)[:3]}"
    assert events.num_rows + len(quarantined) <= n_records
    home = Path(tempfile.mkdtemp(prefix="memstage-fuzz-"))
    result = commit_events(
        MemoryStore(home), events, bad
    )  # the whole batch commits: no value Arrow or DuckDB rejects
    assert result.figures["events_new"] == events.num_rows
    assert MemoryStore(home).counts()["quarantine"] == len(quarantined)


@FUZZ
@given(
    lines=st.lists(st.one_of(st.none(), HOSTILE_LINE, RANDOM_RECORD, JUNK_BYTES), min_size=1, max_size=12),
    seed=st.integers(0, 1000),
)
def test_fuzz_jsonl_every_record_stored_or_quarantined(tmp_path_factory, lines, seed):
    path = tmp_path_factory.mktemp("fuzz") / "in.jsonl"
    good_nos, good_texts = set(), set()
    with path.open("wb") as f:
        for no, line in enumerate(lines, start=1):
            if line is None:  # a good record in between the hostile ones
                rec = good_record(seed * 100 + no)
                good_nos.add(no)
                good_texts.add(rec["text"])
                line = json.dumps(rec)
            f.write((line.encode("utf-8", "surrogatepass") if isinstance(line, str) else line) + b"\n")
    check_outcome(path, "jsonl", len(lines), good_nos, good_texts)


def hostile_column(kind: str, n: int, rng: random.Random) -> pa.Array:
    if kind == "int_text":
        return pa.array([rng.randint(-(2**63), 2**63 - 1) for _ in range(n)], pa.int64())
    if kind == "binary_text":
        return pa.array([rng.randbytes(8) for _ in range(n)], pa.binary())
    if kind == "extreme_time":  # microseconds far outside datetime's years 1-9999
        return pa.array([rng.choice([2**62, -(2**62), 0]) for _ in range(n)], pa.timestamp("us"))
    if kind == "nan_time":
        return pa.array([rng.choice([float("nan"), float("inf"), 1e300, -1e300]) for _ in range(n)])
    if kind == "extreme_seq":
        return pa.array([rng.choice([2**63 - 1, -(2**63), 0]) for _ in range(n)], pa.int64())
    if kind == "nested_meta":
        value: object = 1
        for _ in range(30):
            value = [value]
        return pa.array([{"x": value} for _ in range(n)])
    return pa.array([rng.choice(["\x00", "\ufffe", "a" * 200_000, ""]) for _ in range(n)], pa.string())


@FUZZ
@given(
    n_bad=st.integers(1, 8),
    n_good=st.integers(0, 8),
    kind=st.sampled_from(
        ["int_text", "binary_text", "extreme_time", "nan_time", "extreme_seq", "nested_meta", "odd_text"]
    ),
    seed=st.integers(0, 1000),
)
def test_fuzz_parquet_every_record_stored_or_quarantined(tmp_path_factory, n_bad, n_good, kind, seed):
    """Good rows and hostile rows in separate row groups of one dataset, since a Parquet column has one type."""
    rng = random.Random(seed)
    folder = tmp_path_factory.mktemp("fuzz")
    column = {"int_text": "speaker", "binary_text": "session", "extreme_time": "time", "nan_time": "time",
              "extreme_seq": "seq", "nested_meta": "metadata", "odd_text": "text"}[kind]  # fmt: skip
    bad = {"namespace": pa.array(["fz"] * n_bad), "text": pa.array([f"hostile {i}" for i in range(n_bad)])}
    bad[column] = hostile_column(kind, n_bad, rng)
    good = [{"namespace": "fz", "text": good_record(seed * 100 + i)["text"]} for i in range(n_good)]
    # the hostile rows first, then the good ones, in one file: good rows keep the hostile column null
    rows = pa.table(bad)
    good_table = pa.Table.from_pylist(good) if good else None
    if good_table is not None:
        for name in rows.column_names:
            if name not in good_table.column_names:
                good_table = good_table.append_column(name, pa.nulls(n_good, rows.schema.field(name).type))
        good_table = good_table.select(rows.column_names).cast(rows.schema)
        rows = pa.concat_tables([rows, good_table])
    path = folder / "in.parquet"
    pq.write_table(rows, path)
    good_nos = set(range(n_bad + 1, n_bad + n_good + 1))
    check_outcome(path, "parquet", n_bad + n_good, good_nos, {g["text"] for g in good})


HOSTILE_TURN = st.sampled_from(
    [
        '{"speaker": "A", "dia_id": "D1:9", "text": "deep", "query": ' + "[" * 12_000 + "]" * 12_000 + "}",
        '{"speaker": "A", "dia_id": "D1:8", "text": ' + "7" * 5000 + "}",
        '{"speaker": "A", "dia_id": "D1:7", "text": 1e999}',
        '{"speaker": "A\\ud800", "dia_id": "D1:6", "text": "surrogate speaker"}',
        '{"speaker": "A", "dia_id": "D1:5", "text": "lone \\udc00"}',
        '{"speaker": "A", "dia_id": ' + "[" * 3000 + "]" * 3000 + ', "text": "deep id"}',
        '"not an object"',
        "12345",
        '{"speaker": "A", "text": null}',
    ]
)


@FUZZ
@given(
    turns=st.lists(st.one_of(st.none(), HOSTILE_TURN), min_size=1, max_size=10),
    stamp=st.sampled_from(['"1:56 pm on 8 May, 2023"', '"yesterday"', "1e999", "null", '"\\ud800"']),
    seed=st.integers(0, 1000),
)
def test_fuzz_locomo_every_turn_stored_or_quarantined(tmp_path_factory, turns, stamp, seed):
    good_nos, good_texts, parts = set(), set(), []
    for no, turn in enumerate(turns, start=1):
        if turn is None:
            text = f"good locomo turn {seed}-{no}"
            turn = json.dumps({"speaker": "Ann", "dia_id": f"D1:{no}", "text": text})
            if stamp == '"1:56 pm on 8 May, 2023"':  # only a good stamp makes a good turn
                good_nos.add(no)
                good_texts.add(text)
        parts.append(turn)
    doc = (
        '[{"sample_id": "fz", "qa": [], "conversation": {"speaker_a": "Ann", "speaker_b": "Ben", '
        f'"session_1_date_time": {stamp}, "session_1": [' + ", ".join(parts) + "]}}]"
    )
    path = tmp_path_factory.mktemp("fuzz") / "in.json"
    path.write_text(doc)
    check_outcome(path, "locomo", len(turns), good_nos, good_texts)


def test_ten_thousand_deep_metadata_is_quarantined_and_the_good_records_land(tmp_path):
    """The issue's case: one record nested 10,000 deep used to fail the whole file with RecursionError."""
    path = tmp_path / "in.jsonl"
    deep = '{"namespace": "fz", "text": "deep", "metadata": {"m": ' + "[" * 10_000 + "]" * 10_000 + "}}"
    path.write_text("\n".join([json.dumps(good_record(1)), deep, json.dumps(good_record(2))]) + "\n")
    events, bad = parse_file(path, "jsonl")
    assert events.num_rows == 2 and bad.column("record_no").to_pylist() == [2]
    assert "nested too deeply" in bad.column("reason")[0].as_py()
