"""History: the versions (the supersession chain) and the ops of one memory, oldest first."""

from __future__ import annotations

from typing import Any

from memstage.stores import queries
from memstage.stores.store import MemoryStore, NamespaceError, validate_namespace


class HistoryError(LookupError):
    """No memory (and no op) with that id."""


def _find_namespace(store: MemoryStore, memory_id: str) -> str:
    # Memory ids are content hashes that include the namespace, so one id names one namespace; a
    # hard-deleted memory is still found through its 'delete' op.
    rows = queries.namespaces_of_memory(store, memory_id)
    if not rows:
        raise HistoryError(f"no memory {memory_id!r} in {store.home}")
    if len(rows) > 1:
        raise NamespaceError(
            f"{memory_id!r} exists in several namespaces ({', '.join(sorted(rows))}); pass --namespace"
        )
    return rows[0]


def memory_history(store: MemoryStore, memory_id: str, namespace: str | None = None) -> dict[str, Any]:
    """{memory_id, namespace, versions: rows older -> newer (no embeddings), ops: every op on any of them}."""
    namespace = validate_namespace(namespace) if namespace else _find_namespace(store, memory_id)
    rows = queries.memory_rows_without_embeddings(store, namespace)
    by_id = {r["id"]: r for r in rows}
    older: dict[str, list[str]] = {}
    for r in rows:
        if (
            r["superseded_by"] and r["valid_to"] is not None
        ):  # merges also set superseded_by, with no valid_to
            older.setdefault(r["superseded_by"], []).append(r["id"])
    chain: list[str] = []
    todo = [memory_id]
    while todo:  # walk back through what it superseded, and forward to what superseded it
        mid = todo.pop()
        if mid in chain:
            continue
        chain.append(mid)
        todo += older.get(mid, [])
        r = by_id.get(mid)
        if r and r["superseded_by"] and r["valid_to"] is not None:
            todo.append(r["superseded_by"])
    versions = sorted(
        (by_id[m] for m in chain if m in by_id),
        key=lambda r: (r["version"] or 0, r["valid_from"] or r["created_at"], r["id"]),
    )
    ops = queries.ops_of(store, namespace, chain)
    return {"memory_id": memory_id, "namespace": namespace, "versions": versions, "ops": ops}
