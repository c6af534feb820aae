"""Retrieve: a question in, the best evidence that fits a token budget out.

Hybrid search over a namespace's current indexes (dense + BM25, fused by reciprocal rank), then
memories packed in rank order until the budget (counted with the generator's tokenizer) is full.
A `Retriever` keeps each namespace's indexes and memory rows loaded and reloads them only when the
index stage has written new artifacts, so a warm process answers in milliseconds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpu.lexical_index import LexicalIndex
from gpu.vector_index import VectorIndex
from stores.store import MemoryStore, NamespaceError, validate_namespace

DEFAULT_BUDGET = 1000
RRF_K = 60
CANDIDATES = 100


@dataclass
class LoadedNamespace:
    """One namespace's indexes and the rows retrieval returns, as of one manifest state."""

    stamp: tuple
    dense: dict[int, VectorIndex] = field(default_factory=dict)
    lexical: dict[int, LexicalIndex] = field(default_factory=dict)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)


class Retriever:
    """Hybrid retrieval over one store; holds loaded indexes per namespace."""

    def __init__(self, store: MemoryStore, encoder: Any, token_counter: Any | None = None) -> None:
        self.store = store
        self.encoder = encoder
        self.token_counter = token_counter
        self._loaded: dict[str, LoadedNamespace] = {}

    # ---- loading -------------------------------------------------------------------------------

    def _stamp(self, namespace: str) -> tuple:
        # The index stage writes new files (and removes old ones) on every change, which changes
        # the folder's mtime: a stat per question instead of a database read.
        path = self.store.home / "indexes" / namespace
        try:
            st = path.stat()
        except FileNotFoundError:
            return ()
        return (st.st_mtime_ns, st.st_ino)

    def load(self, namespace: str) -> LoadedNamespace:
        validate_namespace(namespace)
        stamp = self._stamp(namespace)
        cached = self._loaded.get(namespace)
        if cached is not None and cached.stamp == stamp and stamp:
            return cached
        manifest = self.store.current_indexes(namespace).to_pylist()
        if not manifest:
            self.store.require_namespace(namespace)  # raises: unknown namespace
            raise NamespaceError(f"namespace {namespace!r} has no index yet; run `memstage run index --namespace {namespace}`")
        loaded = LoadedNamespace(stamp=stamp)
        for entry in manifest:
            path = self.store.home / entry["path"]
            if entry["kind"] == "dense":
                loaded.dense[entry["level"]] = VectorIndex.load(path)
            else:
                loaded.lexical[entry["level"]] = LexicalIndex.load(path)
        rows = self.store.query(
            """SELECT m.id, m.level, m.text, m.tokens, m.event_ids, m.session, m.event_time, m.speaker,
                      list(json_extract_string(e.metadata, '$.dia_id')) FILTER (WHERE e.id IS NOT NULL) AS dia_ids
               FROM memories m LEFT JOIN events e ON e.namespace = m.namespace AND list_contains(m.event_ids, e.id)
               WHERE m.namespace = ? AND m.status = 'active' AND m.valid_to IS NULL
               GROUP BY ALL""",
            [namespace],
        ).to_pylist()
        loaded.rows = {r["id"]: r for r in rows}
        self._loaded[namespace] = loaded
        return loaded

    # ---- search --------------------------------------------------------------------------------

    def rank(self, namespace: str, question: str, *, levels: tuple[int, ...] | None = None) -> list[tuple[str, float]]:
        """Fused ranking of memory ids (best first) over the chosen levels (all by default)."""
        ns = self.load(namespace)
        query_vec = self.encoder.encode([question])
        scores: dict[str, float] = {}
        for level in sorted(ns.dense):
            if levels is not None and level not in levels:
                continue
            _, dense_ids = ns.dense[level].search(query_vec, CANDIDATES)
            for rank, mid in enumerate(dense_ids[0]):
                scores[mid] = scores.get(mid, 0.0) + 1.0 / (RRF_K + rank + 1)
            if level in ns.lexical:
                lex_ids, _ = ns.lexical[level].search(question, CANDIDATES)
                for rank, mid in enumerate(lex_ids):
                    scores[mid] = scores.get(mid, 0.0) + 1.0 / (RRF_K + rank + 1)
        ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
        return [(mid, s) for mid, s in ranked if mid in ns.rows]

    def retrieve(
        self, namespace: str, question: str, budget: int = DEFAULT_BUDGET, *, levels: tuple[int, ...] | None = None
    ) -> dict[str, Any]:
        """The retrieval result: memories packed in rank order while they fit the budget."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty")
        if budget <= 0:
            raise ValueError(f"budget must be a positive number of tokens, got {budget}")
        start = time.perf_counter()
        ns = self.load(namespace)
        packed, used = [], 0
        for mid, score in self.rank(namespace, question, levels=levels):
            row = ns.rows[mid]
            if used + row["tokens"] > budget:
                continue  # a shorter memory further down may still fit
            used += row["tokens"]
            packed.append(
                {
                    "memory_id": mid,
                    "text": row["text"],
                    "score": round(float(score), 6),
                    "level": int(row["level"]),
                    "tokens": int(row["tokens"]),
                    "event_ids": list(row["event_ids"] or []),
                    "dia_ids": [d for d in (row["dia_ids"] or []) if d],
                    "session": row["session"],
                    "event_time": row["event_time"].isoformat() if row["event_time"] else None,
                }
            )
            if budget - used < 5:
                break
        return {
            "namespace": namespace,
            "question": question,
            "budget": budget,
            "tokens": used,
            "memories": packed,
            "latency_ms": round((time.perf_counter() - start) * 1000, 2),
        }


def record_access(store: MemoryStore, namespace: str, memory_ids: list[str]) -> int:
    """Bump access_count/last_access of retrieved memories (the forget policy's 'use' signal)."""
    if not memory_ids:
        return 0
    with store.writer() as w:
        w.execute(
            """UPDATE memories SET access_count = coalesce(access_count, 0) + 1, last_access = now()
               WHERE namespace = ? AND id IN (SELECT unnest(?))""",
            [namespace, memory_ids],
        )
    return len(memory_ids)


def as_json(result: dict[str, Any]) -> str:
    return json.dumps(result, ensure_ascii=False, default=str)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))
