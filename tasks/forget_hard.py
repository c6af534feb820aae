"""Hard forget: delete a subject's (an era's, a namespace's) data everywhere it lives. NOT undoable.

Deletes matching events and memories (text or metadata), the summaries and topic nodes built from
them, the namespace's matching quarantine rows, and the text of every ops row about them (one new
ops row per deleted memory records the deletion, without the text); rebuilds the index artifacts
(or drops them) and removes stale versions; rewrites the DuckDB file so no free page keeps the bytes;
then byte-searches every file under the data directory for the subject and reports what it found.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - tasks.index.build_indexes uses pa.compute without importing it

from memstage.stores.compact import find_bytes, rewrite_database, tables_holding
from memstage.stores.erase import (
    Erasure,
    commit_erasure,
    erase_candidates,
    quarantine_candidates,
    retire_indexes,
    unembedded_count,
)
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


def _selector(subject: str | None, before: datetime | None, all: bool) -> Callable[..., bool]:  # noqa: A002
    def selected(text: str | None, meta: str | None, when: datetime | None) -> bool:
        if all:
            return True
        if subject is not None:
            return matches(text, subject) or matches(meta, subject)
        return when is not None and before is not None and when < before

    return selected


def doomed(
    events: list[dict[str, Any]], mem: list[dict[str, Any]], selected: Callable[..., bool], *, by_date: bool
) -> tuple[set[str], set[str], set[str]]:
    """(events, level-0 memories, higher nodes) to delete: what matches, what holds a matching
    event, and the summaries and topics built from them (consolidate rebuilds from what is left)."""
    gone_events = {e["id"] for e in events if selected(e["text"], e["metadata"], e["event_time"])}
    holds = lambda m: gone_events & set(m["event_ids"] or [])  # noqa: E731
    gone0 = {
        m["id"]
        for m in mem
        if m["level"] == 0 and (selected(m["text"], m["metadata"], m["event_time"]) or holds(m))
    }
    gone_events |= {e for m in mem if m["id"] in gone0 for e in (m["event_ids"] or [])}
    gone_hi = {
        m["id"]
        for m in mem
        if m["level"] >= 1
        and (selected(m["text"], m["metadata"], None if by_date else m["event_time"]) or holds(m))
    }
    return gone_events, gone0, gone_hi


def _ops_to_redact(
    ops: list[dict[str, Any]], gone: set[str], ids: set[str], subject: str | None
) -> list[str]:
    """Ops about a deleted memory, or whose text names the subject or any deleted id."""
    hexes = {h for i in ids for h in _HEX.findall(i)}
    return [
        o["op_id"]
        for o in ops
        if o["memory_id"] in gone
        or any(
            matches(o[c], subject) or (o[c] and hexes & set(_HEX.findall(o[c])))
            for c in ("before", "after", "reason")
        )
    ]


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
        rows = erase_candidates(store, namespace)
        mem = rows["memories"]
        gone_events, gone0, gone_hi = doomed(
            rows["events"], mem, _selector(subject, before, all), by_date=before is not None
        )
        gone = gone0 | gone_hi
        at = now_utc()
        forget_id = content_hash(namespace, "forget-hard", at.isoformat())
        how = "all" if all else ("subject" if subject is not None else f"before {before:%Y-%m-%d}")
        reason = f"hard forget ({how}, request {forget_id}): text deleted everywhere; NOT undoable"
        erasure = Erasure(
            namespace=namespace,
            events=sorted(gone_events),
            memories=sorted(gone),
            quarantine=_quarantine_rows(store, namespace, subject, before, all),
            ops_to_redact=_ops_to_redact(rows["ops"], gone, gone | gone_events, subject),
            redaction=f"[redacted by hard forget {forget_id}]",
            relinked=[
                m["id"]
                for m in mem
                if m["id"] not in gone and (m["parent"] in gone or m["superseded_by"] in gone)
            ],
            subject=subject,
            new_ops=_deletion_ops(namespace, sorted(gone), reason, flow_run_id, at),
        )
        commit_erasure(store, erasure)
        result.figures = {
            "undoable": False,
            "mode": how,
            "events_deleted": len(gone_events),
            "memories_deleted": len(gone0),
            "summaries_deleted": len(gone_hi),
            "ops_redacted": len(erasure.ops_to_redact),
            "quarantine_deleted": len(erasure.quarantine),
            "links_cut": len(erasure.relinked),
        }
        result.figures["indexes"] = _rebuild_indexes(store, namespace, embed, flow_run_id)
        result.figures["database"] = rewrite_database(store)
        if subject is not None:
            _check_bytes(store, subject, result)
        result.changed = len(gone_events) + len(gone) + len(erasure.quarantine)
    return result


def _deletion_ops(
    namespace: str, ids: list[str], reason: str, flow_run_id: str | None, at: datetime
) -> pa.Table:
    """One op per deleted memory, recording the deletion without its text."""
    ops = [
        make_op(namespace=namespace, memory_id=mid, stage="forget", action="delete", before=None, after=None,
                reason=reason, flow_run_id=flow_run_id, at=at)
        for mid in ids
    ]  # fmt: skip
    return ops_table(ops)


def _check_bytes(store: MemoryStore, subject: str, result: StageResult) -> None:
    found = [str(p.relative_to(store.home)) for p in find_bytes(store.home, subject)]
    result.figures["files_still_containing_subject"] = found
    if found:
        result.figures["tables_still_containing_subject"] = tables_holding(store, subject)


def _quarantine_rows(
    store: MemoryStore,
    namespace: str,
    subject: str | None,
    before: datetime | None,
    all: bool,  # noqa: A002
) -> list[str]:
    """Quarantine rows of the namespace, including those whose namespace field was itself invalid
    (`erin/x`, `erin `) but names it, or whose raw record names it; then the selector applies."""
    rows = quarantine_candidates(store, namespace)
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
    if unembedded_count(store, namespace) == 0:
        build_indexes(store, namespace, flow_run_id=flow_run_id)
        remove_stale_artifacts(store, namespace)
        return "rebuilt"
    retire_indexes(store, namespace)
    store.remove_namespace_files(namespace)
    return "dropped (memories without embeddings; the next index run rebuilds them)"
