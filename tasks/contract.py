"""The stage contract: what every memory operation returns, and how its changes are recorded in `ops`.

A stage is a plain function `(store, namespace, *, flow_run_id, ...) -> StageResult` (or a pure
function over Arrow tables that such a function calls). It computes first, then commits all of its
changes — the rows and their `ops` records — in one `store.writer()` transaction, so a killed run
leaves either everything or nothing, and a rerun on an unchanged store changes nothing (changed=0).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from json.encoder import encode_basestring  # a JSON string with its quotes (ensure_ascii=False)
from typing import Any

import numpy as np
import pyarrow as pa

from memstage.stores.schema import MEMORIES, OPS
from memstage.stores.store import now_utc, to_json

# The two tools stages are handed (by the services actor, an encoder pool, or a test):
Embed = Callable[[Sequence[str]], np.ndarray]  # texts -> float32 matrix, one L2-normalised row per text
CountTokens = Callable[[Sequence[str]], list[int]]  # texts -> token counts with the generator's tokenizer


@dataclass
class StageResult:
    """What a stage run did: the JSON that `memstage run STAGE --json` prints and the Prefect artifact shows."""

    stage: str
    namespace: str
    changed: int = 0
    figures: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "namespace": self.namespace,
            "changed": self.changed,
            **self.figures,
            "duration_s": round(self.duration_s, 3),
        }


@contextmanager
def timed(result: StageResult) -> Iterator[StageResult]:
    start = time.perf_counter()
    try:
        yield result
    finally:
        result.duration_s = time.perf_counter() - start


def content_hash(*parts: Any, length: int = 24) -> str:
    """Stable id from content: the same parts always give the same id (re-ingest is a no-op).
    Each part is hashed as its `json.dumps(default=str, sort_keys=True, ensure_ascii=False)`; strings,
    None, ints and datetimes (most parts, one per event field) are spelled out without the encoder."""
    h = hashlib.sha256()
    for p in parts:
        h.update(_part_json(p).encode())
        h.update(b"\x1f")
    return h.hexdigest()[:length]


def _part_json(p: Any) -> str:
    """json.dumps(p, default=str, sort_keys=True, ensure_ascii=False), byte for byte (tested)."""
    if isinstance(p, str):
        return encode_basestring(p)
    if p is None:
        return "null"
    if type(p) is int:  # not bool (true/false), not an int subclass with its own repr
        return int.__repr__(p)
    if isinstance(p, datetime):  # not JSON: `default=str` makes it a string
        return encode_basestring(str(p))
    return json.dumps(p, default=str, sort_keys=True, ensure_ascii=False)


def row_json(row: dict[str, Any] | None) -> str | None:
    """A memory row as it goes into `ops.before/after`: embeddings left out (they are derived, and big)."""
    if row is None:
        return None
    return to_json({k: v for k, v in row.items() if k != "embedding"})


def new_memory(
    *,
    id: str,  # noqa: A002 - the column's name
    namespace: str,
    level: int,
    text: str,
    event_ids: Sequence[str],
    at: datetime,
    tokens: int | None = None,
    session: str | None = None,
    speaker: str | None = None,
    event_time: datetime | None = None,
    metadata: str | None = None,
    flag: str | None = None,
) -> dict[str, Any]:
    """A new memory row with every MEMORIES column: active, version 1, valid from its event (or now),
    not yet embedded, never accessed. The one place a memory row is spelled out."""
    row = {
        "id": id,
        "namespace": namespace,
        "level": level,
        "text": text,
        "tokens": tokens,
        "embedding": None,
        "parent": None,
        "event_ids": list(event_ids),
        "session": session,
        "speaker": speaker,
        "event_time": event_time,
        "version": 1,
        "valid_from": event_time or at,
        "valid_to": None,
        "superseded_by": None,
        "importance": 0.5,
        "access_count": 0,
        "last_access": None,
        "status": "active",
        "metadata": metadata,
        "created_at": at,
        "updated_at": at,
        "flag": flag,
    }
    assert row.keys() == set(MEMORIES.names), "new_memory and stores.schema.MEMORIES disagree"
    return row


def make_op(
    *,
    namespace: str,
    memory_id: str,
    stage: str,
    action: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    reason: str,
    flow_run_id: str | None,
    at: datetime | None = None,
) -> dict[str, Any]:
    at = at or now_utc()
    after_json = row_json(after)  # once: the JSON of every row is most of an ingest's level-0 step
    # One string hashed, not seven parts JSON-encoded one by one (an op id need only be unique).
    key = "\x1f".join(
        (namespace, memory_id, stage, action, after_json or "", flow_run_id or "", at.isoformat())
    )
    return {
        "op_id": content_hash(key),
        "namespace": namespace,
        "memory_id": memory_id,
        "stage": stage,
        "action": action,
        "before": row_json(before),
        "after": after_json,
        "reason": reason,
        "flow_run_id": flow_run_id,
        "at": at,
    }


def ops_table(ops: Sequence[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(ops), schema=OPS)


def memories_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Memory rows as a table; a row that carries no `flag` is scanned here (tasks.injection), so no
    stage stores a memory unscanned."""
    from memstage.tasks.injection import flag_text

    rows = [r if r.get("flag") is not None else {**r, "flag": flag_text(r.get("text") or "")} for r in rows]
    return pa.Table.from_pylist(rows, schema=MEMORIES)


def commit_memory_changes(store: Any, rows: Sequence[dict[str, Any]], ops: Sequence[dict[str, Any]]) -> int:
    """Write changed memory rows (replacing the stored ones) and their `ops` records in one transaction."""
    if rows:
        with store.writer() as w:
            w.insert("memories", memories_table(rows), replace=True)
            w.insert("ops", ops_table(ops))
    return len(rows)


def record_run(store: Any, result: StageResult, *, flow_run_id: str | None, status: str = "ok") -> None:
    """Append a stage run to the `runs` table (what the dashboards plot over time)."""
    record_runs(store, [result], flow_run_id=flow_run_id, status=status)


def record_runs(
    store: Any, results: Sequence[StageResult], *, flow_run_id: str | None, status: str = "ok"
) -> None:
    """`record_run` of several results in one transaction."""
    from memstage.stores.schema import RUNS

    started = now_utc()
    rows = [
        {
            "run_id": content_hash(result.stage, result.namespace, flow_run_id, started.isoformat()),
            "flow_run_id": flow_run_id,
            "stage": result.stage,
            "namespace": result.namespace,
            "started_at": started,
            "duration_s": result.duration_s,
            "changed": result.changed,
            "figures": to_json(result.figures),
            "status": status,
        }
        for result in results
    ]
    if rows:
        with store.writer() as w:
            w.insert("runs", pa.Table.from_pylist(rows, schema=RUNS))
