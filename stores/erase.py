"""What a hard forget reads and commits: every row of a namespace it may have to delete or redact.

The decisions (which rows match the subject, the era or everything) are tasks/forget_hard.py's;
this module only reads the candidates and commits a decided `Erasure` in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from memstage.stores.store import MemoryStore, validate_namespace


def erase_candidates(store: MemoryStore, namespace: str) -> dict[str, list[dict[str, Any]]]:
    """{events, memories, ops} of the namespace, with the columns a hard forget matches on."""
    ns = [validate_namespace(namespace)]
    return {
        "events": store.query(
            "SELECT id, text, metadata, event_time FROM events WHERE namespace = ?", ns
        ).to_pylist(),
        "memories": store.query(
            "SELECT id, level, text, metadata, event_ids, event_time, parent, superseded_by "
            "FROM memories WHERE namespace = ?",
            ns,
        ).to_pylist(),
        "ops": store.query(
            "SELECT op_id, memory_id, before, after, reason FROM ops WHERE namespace = ?", ns
        ).to_pylist(),
    }


def quarantine_candidates(store: MemoryStore, namespace: str) -> list[dict[str, Any]]:
    """Quarantine rows whose namespace field or raw record may name the namespace (a superset:
    an invalid field such as `erin/x` still names `erin`); the caller keeps the ones that do."""
    return store.query(
        'SELECT id, namespace, raw, "at" FROM quarantine WHERE namespace = ? '
        "OR contains(lower(namespace), lower(?)) OR contains(lower(raw), lower(?))",
        [namespace, namespace, namespace],
    ).to_pylist()


@dataclass
class Erasure:
    """A decided hard forget: what to delete, what to redact, and the ops rows that record it."""

    namespace: str
    events: list[str]
    memories: list[str]
    quarantine: list[str]
    ops_to_redact: list[str]
    redaction: str  # the text that replaces a redacted op's reason
    relinked: list[str]  # surviving memories whose parent or superseded_by pointed at a deleted one
    subject: str | None  # when set: run rows whose figures name it lose their figures
    new_ops: pa.Table = field(default_factory=lambda: pa.table({}))


def commit_erasure(store: MemoryStore, e: Erasure) -> None:
    """Delete and redact in one transaction; quarantine rows by id, whatever their namespace field."""
    gone = sorted(e.memories)
    with store.writer() as w:
        w.delete("events", e.namespace, sorted(e.events))
        w.delete("memories", e.namespace, gone)
        w.conn.register("_bad", pa.table({"id": pa.array(e.quarantine, pa.string())}))
        w.execute("DELETE FROM quarantine WHERE id IN (SELECT id FROM _bad)")
        w.conn.unregister("_bad")
        w.conn.register("_scrub", pa.table({"id": pa.array(e.ops_to_redact, pa.string())}))
        w.execute(
            "UPDATE ops SET before = NULL, after = NULL, reason = ? WHERE namespace = ? AND op_id IN (SELECT id FROM _scrub)",
            [e.redaction, e.namespace],
        )
        w.conn.unregister("_scrub")
        for mid in e.relinked:  # links to deleted nodes are cut; a superseded memory keeps its valid_to
            w.execute(
                """UPDATE memories SET parent = CASE WHEN parent IN (SELECT unnest(?)) THEN NULL ELSE parent END,
                   superseded_by = CASE WHEN superseded_by IN (SELECT unnest(?)) THEN NULL ELSE superseded_by END
                   WHERE namespace = ? AND id = ?""",
                [gone, gone, e.namespace, mid],
            )
        if e.subject is not None:  # an ingest's run row names all its namespaces: 'fz,other'
            w.execute(
                "UPDATE runs SET figures = NULL WHERE (namespace = ? OR list_contains(string_split(namespace, ','), ?)) "
                "AND contains(lower(figures), lower(?))",
                [e.namespace, e.namespace, e.subject],
            )
        if e.new_ops.num_rows:
            w.insert("ops", e.new_ops)


def unembedded_count(store: MemoryStore, namespace: str) -> int:
    """Current active memories still without an embedding (the indexes cannot be rebuilt over them)."""
    t = store.query(
        "SELECT count(*) AS n FROM memories WHERE namespace = ? AND status = 'active' "
        "AND valid_to IS NULL AND embedding IS NULL",
        [validate_namespace(namespace)],
    )
    return int(t.column("n")[0].as_py())


def retire_indexes(store: MemoryStore, namespace: str) -> None:
    """Mark every index artifact of the namespace not current (its files are removed next)."""
    with store.writer() as w:
        w.execute(
            "UPDATE index_manifest SET current = false WHERE namespace = ?", [validate_namespace(namespace)]
        )
