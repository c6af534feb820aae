"""Named reads over the store: every question the rest of memstage asks of its tables, as one function.

All SQL lives in `stores/` (this module, `store.py` and `compact.py`); tasks, flows, the server and
the report call these functions and get Arrow tables or plain rows back. Every read names its
namespace (or, for operator views such as the report and /metrics, explicitly none).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pyarrow as pa

from memstage.stores.store import MemoryStore, validate_namespace


def _where_namespace(namespace: str | None, column: str = "namespace") -> tuple[str, list[Any]]:
    return (f" WHERE {column} = ?", [validate_namespace(namespace)]) if namespace else ("", [])


# ---- operators' views: /metrics and the report ---------------------------------------------------


def active_memory_counts(store: MemoryStore) -> list[dict[str, Any]]:
    """[{namespace, level, n}] of active memories (the /metrics gauge)."""
    return store.query(
        "SELECT namespace, level, count(*) AS n FROM memories WHERE status = 'active' GROUP BY namespace, level"
    ).to_pylist()


def runs(store: MemoryStore, namespace: str | None = None) -> list[dict[str, Any]]:
    """Recorded stage runs, oldest first, figures parsed; eval runs (not a tenant's) are always kept."""
    sql = "SELECT stage, namespace, flow_run_id, started_at, duration_s, changed, figures, status FROM runs"
    params: list[Any] = []
    if namespace:
        sql += " WHERE namespace = ? OR stage = 'eval'"
        params.append(validate_namespace(namespace))
    rows = store.query(sql + " ORDER BY started_at", params).to_pylist()
    for r in rows:
        r["figures"] = json.loads(r["figures"] or "{}")
    return rows


def memory_timeline(store: MemoryStore, namespace: str | None = None) -> list[dict[str, Any]]:
    """[{namespace, level, created_at, status}] of every memory, oldest first."""
    where, params = _where_namespace(namespace)
    sql = f"SELECT namespace, level, created_at, status FROM memories{where} ORDER BY created_at"
    return store.query(sql, params).to_pylist()


def memory_summary(store: MemoryStore, namespace: str | None = None) -> dict[str, int]:
    """{active: active memories, namespaces: namespaces holding any memory}."""
    where, params = _where_namespace(namespace)
    row = store.query(
        "SELECT count(*) FILTER (WHERE status = 'active') AS active, count(DISTINCT namespace) AS ns "
        f"FROM memories{where}",
        params,
    ).to_pylist()[0]
    return {"active": row["active"] or 0, "namespaces": row["ns"] or 0}


def flagged_memories(store: MemoryStore, namespace: str | None = None, limit: int = 100) -> pa.Table:
    """Active, current memories the injection detector flagged: id, level, flag, text (newest first)."""
    where, params = ("AND namespace = ?", [validate_namespace(namespace)]) if namespace else ("", [])
    return store.query(
        f"""SELECT namespace, id, level, flag, text, event_time FROM memories
            WHERE coalesce(flag, '') <> '' AND status = 'active' AND valid_to IS NULL {where}
            ORDER BY event_time DESC NULLS LAST, id LIMIT ?""",
        [*params, int(limit)],
    )


def summary_memories(store: MemoryStore, namespace: str) -> pa.Table:
    """Active, current memories above level 0 (session and topic nodes), without their embeddings: what
    a prompt's standing block is chosen from, read per answer (all memories with embeddings: 120-380 ms
    here for a 419-memory namespace, this: a few)."""
    return store.query(
        """SELECT * EXCLUDE (embedding) FROM memories
            WHERE namespace = ? AND level >= 1 AND status = 'active' AND valid_to IS NULL
            ORDER BY level, session, event_time, id""",
        [validate_namespace(namespace)],
    )


def unscanned_memories(store: MemoryStore, namespace: str) -> pa.Table:
    """Memories stored before the flag column existed (flag null): what the index stage scans once."""
    return store.query(
        "SELECT * FROM memories WHERE namespace = ? AND flag IS NULL ORDER BY id",
        [validate_namespace(namespace)],
    )


# ---- history ----------------------------------------------------------------------------------


def namespaces_of_memory(store: MemoryStore, memory_id: str) -> list[str]:
    """The namespaces holding `memory_id` as a memory or in an op (a hard-deleted one has its delete op)."""
    return (
        store.query(
            "SELECT namespace FROM memories WHERE id = ? UNION SELECT namespace FROM ops WHERE memory_id = ?",
            [memory_id, memory_id],
        )
        .column("namespace")
        .to_pylist()
    )


def memory_rows_without_embeddings(store: MemoryStore, namespace: str) -> list[dict[str, Any]]:
    """Every memory of the namespace, every version, without the embedding column."""
    return store.query(
        "SELECT * EXCLUDE (embedding) FROM memories WHERE namespace = ? ORDER BY version, valid_from, id",
        [validate_namespace(namespace)],
    ).to_pylist()


def ops_of(store: MemoryStore, namespace: str, memory_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The ops on these memories, oldest first, with `before` and `after` parsed."""
    ops = store.query(
        """SELECT op_id, memory_id, stage, action, before, after, reason, flow_run_id, "at" FROM ops
           WHERE namespace = ? AND memory_id IN (SELECT unnest(?)) ORDER BY "at", op_id""",
        [validate_namespace(namespace), list(memory_ids)],
    ).to_pylist()
    for op in ops:
        for key in ("before", "after"):
            op[key] = json.loads(op[key]) if op[key] else None
    return ops


def memories_as_of(
    store: MemoryStore, namespace: str, when: datetime, *, level: int | None = None
) -> pa.Table:
    """The memories that were current at `when`: known by then, and not yet superseded."""
    where = ["namespace = ?", "status = 'active'", "valid_from <= ?", "(valid_to IS NULL OR valid_to > ?)"]
    params: list[Any] = [validate_namespace(namespace), when, when]
    if level is not None:
        where.append("level = ?")
        params.append(level)
    return store.query(
        f"SELECT * FROM memories WHERE {' AND '.join(where)} ORDER BY level, event_time, id", params
    )


# ---- events, as stages need them --------------------------------------------------------------


def event_sources(store: MemoryStore, namespace: str) -> dict[str, dict[str, Any]]:
    """{event id: {id, text, seq}}: the original text and order of each event of the namespace."""
    rows = store.query(
        "SELECT id, text, seq FROM events WHERE namespace = ?", [validate_namespace(namespace)]
    ).to_pylist()
    return {r["id"]: r for r in rows}


def latest_event_time(store: MemoryStore, namespace: str) -> datetime | None:
    """When the namespace's newest event happened (the forget policy's `latest_event` clock)."""
    t = store.query(
        "SELECT max(event_time) AS t FROM events WHERE namespace = ?", [validate_namespace(namespace)]
    )
    return t.column("t")[0].as_py()


def session_speakers(store: MemoryStore, namespace: str) -> dict[str, list[str]]:
    """{session: its distinct speakers, sorted}."""
    rows = store.query(
        "SELECT session, list(DISTINCT speaker ORDER BY speaker) AS speakers FROM events "
        "WHERE namespace = ? GROUP BY session",
        [validate_namespace(namespace)],
    ).to_pylist()
    return {r["session"]: r["speakers"] for r in rows}


def turn_memories(store: MemoryStore, namespace: str) -> dict[str, set[str]]:
    """LoCoMo dia_id -> ids of the current level-0 memories holding that turn's event.

    An equi-join on the unnested event ids (not `list_contains`, a nested-loop join)."""
    rows = store.query(
        """WITH own AS (
               SELECT id AS memory_id, unnest(event_ids) AS event_id FROM memories
               WHERE namespace = ? AND level = 0 AND status = 'active' AND valid_to IS NULL)
           SELECT json_extract_string(e.metadata, '$.dia_id') AS dia_id, own.memory_id
           FROM own JOIN events e ON e.namespace = ? AND e.id = own.event_id""",
        [validate_namespace(namespace), namespace],
    ).to_pylist()
    owns: dict[str, set[str]] = {}
    for r in rows:
        if r["dia_id"]:
            owns.setdefault(r["dia_id"], set()).add(r["memory_id"])
    return owns


def set_parents(w: Any, namespace: str, ids: Sequence[str], parents: Sequence[str | None], at: Any) -> int:
    """Inside a writer: set `parent` (and `updated_at`) of memories by id, one UPDATE, no row
    rewritten whole (consolidate links a million children without reloading their embeddings)."""
    if not ids:
        return 0
    w.conn.register(
        "_parents",
        pa.table({"id": pa.array(list(ids), pa.string()), "parent": pa.array(list(parents), pa.string())}),
    )
    try:
        w.conn.execute(
            "UPDATE memories SET parent = _parents.parent, updated_at = ? FROM _parents "
            "WHERE memories.namespace = ? AND memories.id = _parents.id",
            [at, validate_namespace(namespace)],
        )
    finally:
        w.conn.unregister("_parents")
    return len(ids)


def event_count(store: MemoryStore, namespaces: Sequence[str]) -> int:
    """Events (turns) stored in these namespaces: what maintenance throughput is counted in."""
    for ns in namespaces:
        validate_namespace(ns)
    return int(
        store.query(
            "SELECT count(*) AS n FROM events WHERE namespace IN (SELECT unnest(?))", [list(namespaces)]
        )
        .column("n")[0]
        .as_py()
    )


# ---- the index and the stages ------------------------------------------------------------------


def source_events(store: MemoryStore, namespace: str, ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """{level-0 memory id: its source events' speaker, text and metadata, in event order}.

    Unnest then equi-join (a hash join): joining on list_contains(m.event_ids, e.id) compared every
    memory with every event of the namespace, 0.5 s of the ingest flow's driver time on LoCoMo."""
    rows = store.query(
        """WITH wanted AS (
               SELECT id, unnest(event_ids) AS event_id FROM memories
               WHERE namespace = ? AND level = 0 AND id IN (SELECT unnest(?)))
           SELECT w.id, list({'speaker': e.speaker, 'text': e.text, 'metadata': e.metadata} ORDER BY e.seq)
                  AS events
           FROM wanted w JOIN events e ON e.namespace = ? AND e.id = w.event_id GROUP BY w.id""",
        [validate_namespace(namespace), list(ids), namespace],
    ).to_pylist()
    return {r["id"]: r["events"] for r in rows}


def events_without_level0(store: MemoryStore, namespace: str) -> list[dict[str, Any]]:
    """Events that have no level-0 memory yet (one a stage archived still counts as made)."""
    return store.query(
        """SELECT e.* FROM events e WHERE e.namespace = ?
           AND NOT EXISTS (SELECT 1 FROM memories m WHERE m.namespace = e.namespace AND m.id = 'm0-' || e.id)
           ORDER BY e.session, e.seq""",
        [validate_namespace(namespace)],
    ).to_pylist()


def any_stored(store: MemoryStore, namespaces: Sequence[str]) -> bool:
    """Whether any event or memory of these namespaces is stored."""
    names = [validate_namespace(ns) for ns in namespaces]
    return bool(
        store.query(
            "SELECT (EXISTS (SELECT 1 FROM events WHERE namespace IN (SELECT unnest(?))) OR "
            "EXISTS (SELECT 1 FROM memories WHERE namespace IN (SELECT unnest(?)))) AS found",
            [names, names],
        )
        .column("found")[0]
        .as_py()
    )


def events_without_level0_many(store: MemoryStore, namespaces: Sequence[str]) -> pa.Table:
    """`events_without_level0` of several namespaces in one query, as columns (namespace, id, session,
    speaker, text, event_time, metadata), ordered by namespace, session and seq."""
    return store.query(
        """SELECT e.namespace, e.id, e.session, e.speaker, e.text, e.event_time, e.metadata
           FROM events e WHERE e.namespace IN (SELECT unnest(?))
           AND NOT EXISTS (SELECT 1 FROM memories m WHERE m.namespace = e.namespace AND m.id = 'm0-' || e.id)
           ORDER BY e.namespace, e.session, e.seq""",
        [[validate_namespace(ns) for ns in namespaces]],
    )


def unembedded_many(store: MemoryStore, namespaces: Sequence[str]) -> pa.Table:
    """`unembedded` of several namespaces in one query: (namespace, id, text, metadata) by namespace, id."""
    return store.query(
        "SELECT namespace, id, text, metadata FROM memories WHERE namespace IN (SELECT unnest(?)) "
        "AND embedding IS NULL AND status = 'active' ORDER BY namespace, id",
        [[validate_namespace(ns) for ns in namespaces]],
    )


def unembedded(store: MemoryStore, namespace: str) -> pa.Table:
    """(id, text, metadata) of the active memories whose embedding is null: new, or text changed by a stage."""
    return store.query(
        "SELECT id, text, metadata FROM memories WHERE namespace = ? AND embedding IS NULL AND status = 'active' ORDER BY id",
        [validate_namespace(namespace)],
    )


def set_embeddings(store: MemoryStore, namespace: str, embeddings: pa.Table) -> None:
    """Write computed embeddings ({id, embedding}) onto their memories, in one transaction."""
    with store.writer() as w:
        w.conn.register("_emb", embeddings)
        try:
            w.execute(
                "UPDATE memories SET embedding = _emb.embedding FROM _emb "
                "WHERE memories.namespace = ? AND memories.id = _emb.id",
                [validate_namespace(namespace)],
            )
        finally:
            w.conn.unregister("_emb")


def level0_token_rows(store: MemoryStore, namespace: str) -> list[dict[str, Any]]:
    """(tokens, metadata) of the active level-0 memories: what compression's ratio is taken over."""
    return store.query(
        "SELECT tokens, metadata FROM memories WHERE namespace = ? AND level = 0 AND status = 'active'",
        [validate_namespace(namespace)],
    ).to_pylist()


def archived_by_forget(store: MemoryStore, namespace: str, ids: Sequence[str]) -> list[dict[str, Any]]:
    """Those of `ids` that are archived, and were archived by the forget stage (so restore may undo it)."""
    return store.query(
        """SELECT m.* FROM memories m WHERE m.namespace = ? AND m.status = 'archived' AND m.id IN (SELECT unnest(?))
           AND EXISTS (SELECT 1 FROM ops o WHERE o.namespace = m.namespace AND o.memory_id = m.id
                       AND o.stage = 'forget' AND o.action = 'archive')""",
        [validate_namespace(namespace), list(ids)],
    ).to_pylist()
