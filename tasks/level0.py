"""Level-0 memories of new events as Arrow tables: rows and their `ops` rows in one columnar pass.

The same rows and ops as `tasks.index.level0_rows` (tested equal, byte for byte: the op's `after`
JSON and so its op id), without a dict per row and a `json.dumps` per field: the `after` JSON of a
level-0 row is a fixed template whose only free fields are strings, each JSON-escaped once. The
injection flags and token counts, the per-text cost of a level-0 row (regexes and a tokenizer), and
the rows themselves are computed on a pool of processes (`many_tables`) when there are many texts,
so a GPU host's cores share the driver's per-turn work; results are the same as computed inline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from json.encoder import encode_basestring  # JSON string with its quotes, as json.dumps(ensure_ascii=False)
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from memstage.stores.schema import MEMORIES, OPS
from memstage.stores.store import MemoryStore, now_utc
from memstage.tasks import workers
from memstage.tasks.injection import flag_text

REASON = "level-0 memory for a new event"
POOL_MIN_TEXTS = 2048  # fewer texts: computed inline (a pool's round trip costs more than it saves)
POOL_CHUNK = 512

# `row_json(new_memory(...))` of a level-0 row: json.dumps(sort_keys=True, default=str) spelled out.
_AFTER = (
    '{{"access_count": 0, "created_at": {at}, "event_ids": [{eid}], "event_time": {et}, "flag": {flag}, '
    '"id": {id}, "importance": 0.5, "last_access": null, "level": 0, "metadata": {md}, "namespace": {ns}, '
    '"parent": null, "session": {session}, "speaker": {speaker}, "status": "active", '
    '"superseded_by": null, "text": {text}, "tokens": {tokens}, "updated_at": {at}, "valid_from": {vf}, '
    '"valid_to": null, "version": 1}}'
)


def _js(value: Any) -> str:
    """A value as json.dumps(default=str, ensure_ascii=False) writes it (strings, datetimes, None)."""
    if value is None:
        return "null"
    return encode_basestring(value if isinstance(value, str) else str(value))


def _op_id(key: str) -> str:
    """`contract.content_hash(key)` of one string part."""
    return hashlib.sha256(encode_basestring(key).encode() + b"\x1f").hexdigest()[:24]


def level0_tables(
    namespace: str,
    new: Sequence[dict[str, Any]],
    texts: Sequence[str],
    tokens: Sequence[int],
    flags: Sequence[str],
    *,
    flow_run_id: str | None = None,
    at: datetime | None = None,
) -> tuple[pa.Table, pa.Table]:
    """(memories rows, ops rows) of the level-0 memories of `new` events (embedding null)."""
    at = at or now_utc()
    n = len(new)
    ids = ["m0-" + ev["id"] for ev in new]
    event_times = [ev["event_time"] for ev in new]
    valid_from = [t or at for t in event_times]
    at_js, at_iso, ns_js, run = _js(at), at.isoformat(), _js(namespace), flow_run_id or ""
    after, op_ids = [], []
    for k, ev in enumerate(new):
        doc = _AFTER.format(
            at=at_js, eid=_js(ev["id"]), et=_js(event_times[k]), flag=_js(flags[k]), id=_js(ids[k]),
            md=_js(ev["metadata"]), ns=ns_js, session=_js(ev["session"]), speaker=_js(ev["speaker"]),
            text=_js(texts[k]), tokens="null" if tokens[k] is None else int(tokens[k]), vf=_js(valid_from[k]),
        )  # fmt: skip
        after.append(doc)
        op_ids.append(_op_id("\x1f".join((namespace, ids[k], "index", "insert", doc, run, at_iso))))
    ts = MEMORIES.field("created_at").type

    def const(value: Any, name: str) -> pa.Array:
        return pa.array([value] * n, MEMORIES.field(name).type)

    rows = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "namespace": const(namespace, "namespace"),
            "level": const(0, "level"),
            "text": pa.array(list(texts), pa.string()),
            "tokens": pa.array(list(tokens), pa.int32()),
            "embedding": pa.nulls(n, MEMORIES.field("embedding").type),
            "parent": pa.nulls(n, pa.string()),
            "event_ids": pa.array([[ev["id"]] for ev in new], pa.list_(pa.string())),
            "session": pa.array([ev["session"] for ev in new], pa.string()),
            "speaker": pa.array([ev["speaker"] for ev in new], pa.string()),
            "event_time": pa.array(event_times, ts),
            "version": const(1, "version"),
            "valid_from": pa.array(valid_from, ts),
            "valid_to": pa.nulls(n, ts),
            "superseded_by": pa.nulls(n, pa.string()),
            "importance": const(0.5, "importance"),
            "access_count": const(0, "access_count"),
            "last_access": pa.nulls(n, ts),
            "status": const("active", "status"),
            "metadata": pa.array([ev["metadata"] for ev in new], pa.string()),
            "created_at": const(at, "created_at"),
            "updated_at": const(at, "updated_at"),
            "flag": pa.array(list(flags), pa.string()),
        },
        schema=MEMORIES,
    )
    ops = pa.table(
        {
            "op_id": pa.array(op_ids, pa.string()),
            "namespace": rows.column("namespace"),
            "memory_id": rows.column("id"),
            "stage": pa.array(["index"] * n, pa.string()),
            "action": pa.array(["insert"] * n, pa.string()),
            "before": pa.nulls(n, pa.string()),
            "after": pa.array(after, pa.string()),
            "reason": pa.array([REASON] * n, pa.string()),
            "flow_run_id": pa.array([flow_run_id] * n, pa.string()),
            "at": pa.array([at] * n, OPS.field("at").type),
        },
        schema=OPS,
    )
    return rows, ops


def insert_level0(store: MemoryStore, rows: pa.Table, ops: pa.Table) -> dict[str, int]:
    """Insert level-0 rows (with their embeddings) and their ops rows in one transaction, one insert
    per table; rows a concurrent run stored already are left out, with their ops rows. Returns how
    many rows were new, per namespace."""
    if rows.num_rows == 0:
        return {}
    with store.writer() as w:
        stored = w.existing_ids("memories", rows.column("id").to_pylist())
        if stored:
            keep = pa.array([i not in stored for i in rows.column("id").to_pylist()], pa.bool_())
            rows, ops = rows.filter(keep), ops.filter(keep)  # ops are in the rows' order
        w.insert("memories", rows, absent=True)
        w.insert("ops", ops, absent=True)  # op ids hash the run's time: never stored before
    counts = pc.value_counts(rows.column("namespace")).to_pylist()
    return {c["values"]: c["counts"] for c in counts}


# ---- many namespaces at once, on the process pool ------------------------------------------------

_counter: Any = None
Events = pa.Table | Sequence[dict[str, Any]]  # new events: columns (the flow) or rows
Part = tuple[str, Events, list[str]]  # (namespace, new events, their texts)


def _rows(new: Events) -> list[dict[str, Any]]:
    return new.to_pylist() if isinstance(new, pa.Table) else list(new)


def _piece(new: Events, start: int, stop: int) -> Events:
    """Rows start..stop; of a table, a compact copy (a slice would carry its whole buffers to the pool)."""
    return workers.owned(new.slice(start, stop - start)) if isinstance(new, pa.Table) else new[start:stop]


def _count(models_root: str, texts: list[str]) -> list[int]:
    global _counter
    if _counter is None:
        from memstage.gpu.tokenizer import TokenCounter

        _counter = TokenCounter(Path(models_root))
    return _counter.count_many(texts)


def _part_tables(
    models_root: str, part: Part, flow_run_id: str | None, at: datetime
) -> tuple[pa.Table, pa.Table]:
    """`level0_tables` of one part, its flags and token counts computed here (in a pool process)."""
    namespace, new, texts = part
    flags = [flag_text(t) for t in texts]
    return level0_tables(
        namespace, _rows(new), texts, _count(models_root, texts), flags, flow_run_id=flow_run_id, at=at
    )


@dataclass
class PendingTables:
    """A namespace's level-0 tables being made: one future of (rows, ops rows) per piece, in order."""

    pieces: list[Future]
    _tables: tuple[pa.Table, pa.Table] | None = None

    def done(self) -> bool:
        return self._tables is not None or all(f.done() for f in self.pieces)

    def tables(self) -> tuple[pa.Table, pa.Table]:
        """(rows, ops rows), waiting for the pieces still being made (a pool error is raised here)."""
        if self._tables is None:
            pairs = [f.result() for f in self.pieces]
            self._tables = (pa.concat_tables([r for r, _ in pairs]), pa.concat_tables([o for _, o in pairs]))
            self.pieces = []
        return self._tables


def start_many_tables(
    parts: dict[str, tuple[Events, list[str]]],
    count_tokens: Any,
    models_root: Path | None,
    *,
    flow_run_id: str | None,
    at: datetime,
) -> dict[str, PendingTables]:
    """namespace -> its `level0_tables` (new events as columns, texts; flags and token counts included)
    being made: inline, before this returns, when they are few (or no `models_root` to count with),
    else in pieces of POOL_CHUNK on the process pool (tasks/workers.py), which does every per-text
    step, while the caller goes on (the ingest flow stores the namespaces whose rows are made); the
    same tables either way."""
    total = sum(len(texts) for _, texts in parts.values())
    if total < POOL_MIN_TEXTS or models_root is None or workers.pool_size() < 2:
        out = {}
        for ns, (new, texts) in parts.items():
            if texts:
                flags = [flag_text(t) for t in texts]
                made = level0_tables(
                    ns, _rows(new), texts, count_tokens(texts), flags, flow_run_id=flow_run_id, at=at
                )
                out[ns] = PendingTables([workers.finished(made)])
        return out
    count_tokens(["x"])  # the tokenizer's files made here once, not by every pool process at once
    pool = workers.get_pool()
    out = {}
    for ns, (new, texts) in parts.items():
        pieces = [
            pool.submit(
                _part_tables,
                str(models_root),
                (ns, _piece(new, i, min(i + POOL_CHUNK, len(texts))), texts[i : i + POOL_CHUNK]),
                flow_run_id,
                at,
            )
            for i in range(0, len(texts), POOL_CHUNK)
        ]
        if pieces:
            out[ns] = PendingTables(pieces)
    return out


def many_tables(
    parts: dict[str, tuple[Events, list[str]]],
    count_tokens: Any,
    models_root: Path | None,
    *,
    flow_run_id: str | None,
    at: datetime,
) -> dict[str, tuple[pa.Table, pa.Table]]:
    """`start_many_tables`, waited for: namespace -> (rows, ops rows)."""
    pending = start_many_tables(parts, count_tokens, models_root, flow_run_id=flow_run_id, at=at)
    return {ns: p.tables() for ns, p in pending.items()}
