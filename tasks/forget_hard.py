"""Hard forget: delete a subject's (an era's, a namespace's) data everywhere it lives. NOT undoable.

Deletes matching events and memories (text or metadata), the summaries and topic nodes built from
them, the namespace's matching quarantine rows, and the text of every ops row about them (one new
ops row per deleted memory records the deletion, without the text); rebuilds the index artifacts
(or drops them) and removes stale versions; rewrites the DuckDB file so no free page keeps the bytes;
then byte-searches every file under the data directory for the subject and reports what it found.
"""

from __future__ import annotations

import re
from datetime import datetime

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - tasks.index.build_indexes uses pa.compute without importing it
from memstage.stores.compact import find_bytes, rewrite_database, tables_holding
from memstage.stores.store import MemoryStore, now_utc, validate_namespace
from memstage.tasks.contract import StageResult, content_hash, make_op, ops_table, timed
from memstage.tasks.index import Embed, build_indexes, embed_missing, remove_stale_artifacts

_HEX = re.compile(r"[0-9a-f]{24}")


class ForgetError(ValueError):
    """A forget request that cannot be carried out as given."""


def check_selector(subject: str | None, before: datetime | None, all: bool) -> None:  # noqa: A002
    if sum(x is not None and x is not False for x in (subject, before, all or None)) != 1:
        raise ForgetError("give exactly one of subject, before or all")


def matches(value: str | None, subject: str | None) -> bool:
    return bool(subject) and value is not None and subject.lower() in value.lower()


def forget_hard(
    store: MemoryStore,
    namespace: str,
    *,
    subject: str | None = None,
    before: datetime | None = None,
    all: bool = False,  # noqa: A002 - mirrors the --all flag
    embed: Embed | None = None,
    flow_run_id: str | None = None,
) -> StageResult:
    """Delete a subject's (or an era's, or a namespace's) data everywhere it lives. NOT undoable."""
    validate_namespace(namespace)
    check_selector(subject, before, all)
    if subject is not None and len(subject.strip()) < 3:
        raise ForgetError(
            "subject must be at least 3 characters (a shorter one would match nearly everything)"
        )
    result = StageResult("forget.hard", namespace)
    with timed(result):
        events = store.query(
            "SELECT id, text, metadata, event_time FROM events WHERE namespace = ?", [namespace]
        ).to_pylist()
        mem = store.query(
            "SELECT id, level, text, metadata, event_ids, event_time, parent, superseded_by FROM memories WHERE namespace = ?",
            [namespace],
        ).to_pylist()

        def selected(text: str | None, meta: str | None, when: datetime | None) -> bool:
            if all:
                return True
            if subject is not None:
                return matches(text, subject) or matches(meta, subject)
            return when is not None and when < before

        gone_events = {e["id"] for e in events if selected(e["text"], e["metadata"], e["event_time"])}
        gone0 = {
            m["id"]
            for m in mem
            if m["level"] == 0
            and (
                selected(m["text"], m["metadata"], m["event_time"]) or gone_events & set(m["event_ids"] or [])
            )
        }
        gone_events |= {e for m in mem if m["id"] in gone0 for e in (m["event_ids"] or [])}
        # summaries and topics built from deleted items go too (consolidate rebuilds them from what is left)
        gone_hi = {
            m["id"]
            for m in mem
            if m["level"] >= 1
            and (
                selected(m["text"], m["metadata"], None if before else m["event_time"])
                or gone_events & set(m["event_ids"] or [])
            )
        }
        gone = gone0 | gone_hi
        hexes = {h for i in gone | gone_events for h in _HEX.findall(i)}
        at = now_utc()
        forget_id = content_hash(namespace, "forget-hard", at.isoformat())
        how = "all" if all else ("subject" if subject is not None else f"before {before:%Y-%m-%d}")
        ops_rows = store.query(
            "SELECT op_id, memory_id, before, after, reason FROM ops WHERE namespace = ?", [namespace]
        ).to_pylist()
        scrub = [
            o["op_id"]
            for o in ops_rows
            if o["memory_id"] in gone
            or any(
                matches(o[c], subject) or (o[c] and hexes & set(_HEX.findall(o[c])))
                for c in ("before", "after", "reason")
            )
        ]
        gone_quarantine = _quarantine_rows(store, namespace, subject, before, all)
        dangling = [
            m for m in mem if m["id"] not in gone and (m["parent"] in gone or m["superseded_by"] in gone)
        ]
        reason = f"hard forget ({how}, request {forget_id}): text deleted everywhere; NOT undoable"
        new_ops = [
            make_op(
                namespace=namespace,
                memory_id=mid,
                stage="forget",
                action="delete",
                before=None,
                after=None,
                reason=reason,
                flow_run_id=flow_run_id,
                at=at,
            )
            for mid in sorted(gone)
        ]
        with store.writer() as w:
            w.delete("events", namespace, sorted(gone_events))
            w.delete("memories", namespace, sorted(gone))
            w.conn.register("_bad", pa.table({"id": pa.array(gone_quarantine, pa.string())}))
            w.execute("DELETE FROM quarantine WHERE id IN (SELECT id FROM _bad)")  # any namespace field
            w.conn.unregister("_bad")
            w.conn.register("_scrub", pa.table({"id": pa.array(scrub, pa.string())}))
            w.execute(
                "UPDATE ops SET before = NULL, after = NULL, reason = ? WHERE namespace = ? AND op_id IN (SELECT id FROM _scrub)",
                [f"[redacted by hard forget {forget_id}]", namespace],
            )
            w.conn.unregister("_scrub")
            for m in dangling:  # links to deleted nodes are cut; a superseded memory keeps its valid_to
                w.execute(
                    """UPDATE memories SET parent = CASE WHEN parent IN (SELECT unnest(?)) THEN NULL ELSE parent END,
                       superseded_by = CASE WHEN superseded_by IN (SELECT unnest(?)) THEN NULL ELSE superseded_by END
                       WHERE namespace = ? AND id = ?""",
                    [sorted(gone), sorted(gone), namespace, m["id"]],
                )
            if subject is not None:  # an ingest's run row names all its namespaces: 'fz,other'
                w.execute(
                    "UPDATE runs SET figures = NULL WHERE (namespace = ? OR list_contains(string_split(namespace, ','), ?)) "
                    "AND contains(lower(figures), lower(?))",
                    [namespace, namespace, subject],
                )
            w.insert("ops", ops_table(new_ops))
        result.figures = {
            "undoable": False,
            "mode": how,
            "events_deleted": len(gone_events),
            "memories_deleted": len(gone0),
            "summaries_deleted": len(gone_hi),
            "ops_redacted": len(scrub),
            "quarantine_deleted": len(gone_quarantine),
            "links_cut": len(dangling),
        }
        result.figures["indexes"] = _rebuild_indexes(store, namespace, embed, flow_run_id)
        result.figures["database"] = rewrite_database(store)
        if subject is not None:
            result.figures["files_still_containing_subject"] = [
                str(p.relative_to(store.home)) for p in find_bytes(store.home, subject)
            ]
            if result.figures["files_still_containing_subject"]:
                result.figures["tables_still_containing_subject"] = tables_holding(store, subject)
        result.changed = len(gone_events) + len(gone) + len(gone_quarantine)
    return result


def _quarantine_rows(
    store: MemoryStore,
    namespace: str,
    subject: str | None,
    before: datetime | None,
    all: bool,  # noqa: A002
) -> list[str]:
    """Quarantine rows of the namespace, including those whose namespace field was itself invalid
    (`erin/x`, `erin `) but names it, or whose raw record names it; then the selector applies."""
    rows = store.query(
        'SELECT id, namespace, raw, "at" FROM quarantine WHERE namespace = ? '
        "OR contains(lower(namespace), lower(?)) OR contains(lower(raw), lower(?))",
        [namespace, namespace, namespace],
    ).to_pylist()
    ns = namespace.lower()
    ours = [
        q
        for q in rows
        if q["namespace"] == namespace
        or _names(q["namespace"], ns)
        or re.search(r'"namespace"\s*:\s*"' + re.escape(ns) + r"(?=[^a-z0-9._-])", (q["raw"] or "").lower())
    ]
    return [q["id"] for q in ours if all or matches(q["raw"], subject) or (before and q["at"] < before)]


def _names(field: str | None, ns: str) -> bool:
    """An invalid namespace field that is the namespace plus junk: 'erin/x', ' erin', 'erin\\n'."""
    if not field:
        return False
    f = field.lower().strip()
    return f == ns or bool(re.match(re.escape(ns) + r"[^a-z0-9._-]", f))


def _rebuild_indexes(store: MemoryStore, namespace: str, embed: Embed | None, flow_run_id: str | None) -> str:
    """Indexes hold the deleted text (and BM25 its words): rebuild them, or drop them when embeddings are missing."""
    if embed is not None:
        embed_missing(store, namespace, embed)
    missing = (
        store.query(
            "SELECT count(*) AS n FROM memories WHERE namespace = ? AND status = 'active' AND valid_to IS NULL AND embedding IS NULL",
            [namespace],
        )
        .column("n")[0]
        .as_py()
    )
    if missing == 0:
        build_indexes(store, namespace, flow_run_id=flow_run_id)
        remove_stale_artifacts(store, namespace)
        return "rebuilt"
    with store.writer() as w:
        w.execute("UPDATE index_manifest SET current = false WHERE namespace = ?", [namespace])
    store.remove_namespace_files(namespace)
    return "dropped (memories without embeddings; the next index run rebuilds them)"
