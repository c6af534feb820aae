"""Small hand-made conversations for the stage tests, and a helper that loads one into a store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memstage.stores.store import MemoryStore
from memstage.tasks.index import materialise_level0, run_index
from memstage.tasks.ingest import commit_events, parse_file

# Alice's facts change between the sessions (city, employer); one turn is pure filler; two turns
# say the same thing twice; "Pixel" is a subject to forget.
ALICE = [
    ("s1", "Alice", "Hey Bob! Good to see you! How have you been?", "2023-05-01T10:00:00Z"),
    ("s1", "Bob", "Hi Alice! Great, thanks. What's new with you?", "2023-05-01T10:01:00Z"),
    ("s1", "Alice", "I live in Boston now and I work at Acme Robotics.", "2023-05-01T10:02:00Z"),
    (
        "s1",
        "Alice",
        "Hey Bob, oh wow, guess what! So good to see you again! I adopted a dog named Pixel yesterday. He is 3 years old.",
        "2023-05-01T10:03:00Z",
    ),
    ("s1", "Bob", "Pixel is a great name! I have 2 cats myself.", "2023-05-01T10:04:00Z"),
    ("s1", "Alice", "Pixel loves long walks by the river every morning.", "2023-05-01T10:05:00Z"),
    ("s1", "Alice", "Pixel loves long walks by the river every single morning.", "2023-05-01T10:06:00Z"),
    ("s2", "Alice", "Big news: I moved to Seattle last month! The rain is nice.", "2023-09-10T09:00:00Z"),
    ("s2", "Bob", "Wow, Seattle! Are you still at Acme Robotics?", "2023-09-10T09:01:00Z"),
    ("s2", "Alice", "No, I work at Blue Harbor Labs now, I started in August.", "2023-09-10T09:02:00Z"),
    ("s2", "Bob", "My sister Carol lives in Denver and works at a bakery.", "2023-09-10T09:03:00Z"),
    ("s2", "Alice", "Thanks so much, Bob!", "2023-09-10T09:04:00Z"),
]


def write_jsonl(path: Path, namespace: str, turns: list[tuple[str, str, str, str]]) -> Path:
    rows: list[dict[str, Any]] = [
        {"namespace": namespace, "session": s, "speaker": spk, "text": text, "time": t}
        for s, spk, text, t in turns
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(
    store: MemoryStore, namespace: str, turns: list[tuple[str, str, str, str]], count_tokens: Any
) -> None:
    """Ingest `turns` into `namespace` and make their level-0 memories."""
    path = write_jsonl(store.home / f"{namespace}-input.jsonl", namespace, turns)
    commit_events(store, *parse_file(path, "jsonl"))
    path.unlink()  # the input file is not part of the store (and would hold text a hard forget removes)
    materialise_level0(store, namespace, count_tokens=count_tokens)


def answered_session(
    store: MemoryStore, namespace: str, answer: str, encoder: Any, counter: Any
) -> dict[str, Any]:
    """One session (a user's question, the assistant's `answer`, a thanks) ingested and indexed, as
    ingest leaves it; returns the answer's level-0 memory."""
    turns = [
        ("s1", "user", "What did your cousin buy on the trip?", "2023-05-01T10:00:00Z"),
        ("s1", "assistant", answer, "2023-05-01T10:01:00Z"),
        ("s1", "user", "Nice, thanks!", "2023-05-01T10:02:00Z"),
    ]
    load(store, namespace, turns, counter.count_many)
    run_index(store, namespace, embed=encoder.encode, count_tokens=counter.count_many)
    return next(m for m in store.memories(namespace, level=0).to_pylist() if m["speaker"] == "assistant")


def by_text(store: MemoryStore, namespace: str, needle: str, **kw: Any) -> list[dict[str, Any]]:
    rows = store.query("SELECT * FROM memories WHERE namespace = ? ORDER BY id", [namespace]).to_pylist()
    return [r for r in rows if needle in r["text"] and all(r[k] == v for k, v in kw.items())]


def table_contents(store: MemoryStore, namespace: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every table's rows minus what differs between equal runs (timestamps, op ids, run ids), for comparisons."""
    volatile = {
        "created_at",
        "updated_at",
        "ingested_at",
        "at",
        "op_id",
        "flow_run_id",
        "started_at",
        "duration_s",
        "run_id",
    }
    out = {}
    for table in ("events", "memories", "ops", "quarantine"):
        where = "WHERE namespace = ?" if namespace else ""
        rows = store.query(f"SELECT * FROM {table} {where}", [namespace] if namespace else []).to_pylist()
        clean = []
        for r in rows:
            r = {k: v for k, v in r.items() if k not in volatile}
            for key in ("before", "after"):
                if isinstance(r.get(key), str):
                    d = json.loads(r[key])
                    r[key] = json.dumps({k: v for k, v in d.items() if k not in volatile}, sort_keys=True)
            if r.get("embedding") is not None:
                r["embedding"] = [round(x, 3) for x in r["embedding"]]
            clean.append(r)
        out[table] = sorted(clean, key=lambda r: json.dumps(r, sort_keys=True, default=str))
    return out
