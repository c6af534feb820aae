"""Retrieve: a question in, the best evidence that fits a token budget out.

Scoring (no LLM, CPU, a few milliseconds on a warm process), over a namespace's level-0 memories:
1. hybrid relevance: cosine to the question's embedding and BM25 (stemmed, speaker names kept),
   each z-normalised over the namespace, mixed with a fixed weight; both over the text a memory is
   found by (`tasks.index.index_text`: a turn's full original words, while what is packed is the
   memory's text, which the compress stage may have shortened);
2. conversation structure: a turn inherits part of its better neighbour's score (a short reply
   "yes, last week!" lives next to the question it answers), and every turn of a session gets part
   of its session's score (mean of its best turns), so the budget goes to the right sessions;
   level-1/2 nodes of the consolidate stage can add their own score to their children (top-down:
   find the node, spend the budget on its turns; off by default, see HIERARCHY), or be packed
   themselves when `levels` asks for them;
3. question cues: a boost for turns by the participant the question names, and for turns whose
   event time falls in a period the question names ("in October 2023", "on 3 June, 2023").
Memories are then packed in score order while they fit the budget (counted with the generator's
tokenizer); exact duplicates are skipped. The weights were set on the LoCoMo dev split, in a flat
region (neighbouring values change recall@1000 by < 0.01); choosing them leave-one-conversation-out
gave 0.847 recall@1000 on the held-out conversations against 0.851 in-sample.
A `Retriever` keeps each namespace's arrays loaded and reloads them only when the index stage has
written new artifacts.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, TypeVar

import bm25s
import numpy as np
from memstage.gpu.vector_index import VectorIndex
from memstage.stores.store import MemoryStore, NamespaceError, validate_namespace
from memstage.tasks.index import index_text

from memstage.defaults import DEFAULT_BUDGET  # noqa: F401 - re-exported

W_DENSE = 0.7  # share of the dense z-score in the hybrid score (BM25 gets the rest)
NEIGHBOUR = 0.4  # share of the better adjacent turn's score a turn inherits (same session only)
SESSION = 0.5  # weight of the session's score (mean of its SESSION_TOP best turns) on its turns
SESSION_TOP = 3
# Weight of a level-1/2 node's z-score on its level-0 descendants (top-down through `parent`). Off:
# with the consolidate stage's extractive session/topic nodes, 0.3 cost 0.03 recall@1000 on the dev
# split; the session score computed from the turns themselves does that job better.
HIERARCHY = 0.0
SPEAKER = 0.4  # boost for turns by the one participant the question names
PERIOD = 1.0  # boost for turns whose event time falls in a period the question names
PERIOD_SLACK = (timedelta(days=14), timedelta(days=40))  # an event is talked about soon after it
MIN_LEFT = 5  # stop packing once fewer tokens than this are left

_SUFFIXES = (
    ("ies", "y"), ("ied", "y"), ("sses", "ss"), ("ness", ""), ("ment", ""), ("ings", ""),
    ("ing", ""), ("edly", ""), ("ed", ""), ("ly", ""), ("es", ""), ("s", ""),
)  # fmt: skip


def stem(word: str) -> str:
    """A light suffix stripper ("camped", "camping" -> "camp"): BM25 recall without a stemmer package."""
    if len(word) <= 3:
        return word
    for suffix, repl in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            if suffix == "s" and word.endswith(("ss", "us", "is")):
                return word
            out = word[: -len(suffix)] + repl
            if (
                suffix in ("ing", "ed", "ings")
                and len(out) > 3
                and out[-1] == out[-2]
                and out[-1] not in "lsz"
            ):
                out = out[:-1]  # "running" -> "run"
            return out
    return word


T = TypeVar("T")


def pack_within_budget(
    ranked: Iterable[T],
    tokens: Callable[[T], int],
    budget: int,
    *,
    key: Callable[[T], str] | None = None,
) -> tuple[list[T], int]:
    """Greedy packing in rank order: what does not fit is skipped (a shorter item further down may
    still fit), items with an already packed `key` are skipped, and packing stops once fewer than
    MIN_LEFT tokens are left. Returns (packed items, tokens used)."""
    packed: list[T] = []
    used, seen = 0, set()
    for item in ranked:
        n = tokens(item)
        k = key(item) if key is not None else None
        if used + n > budget or (k is not None and k in seen):
            continue
        used += n
        if k is not None:
            seen.add(k)
        packed.append(item)
        if budget - used < MIN_LEFT:
            break
    return packed, used


class _Stemmer:
    def stemWords(self, words: list[str]) -> list[str]:  # noqa: N802 - the interface bm25s expects
        return [stem(w) for w in words]


_STEMMER = _Stemmer()


def analyse(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords="en", stemmer=_STEMMER, return_ids=False, show_progress=False)


# ---- periods named in a question -------------------------------------------------------------------

_MONTHS = [m.lower() for m in calendar.month_name[1:]]
_MONTH_RE = "|".join(_MONTHS)
_DATE = re.compile(
    rf"\b(?:(\d{{1,2}})(?:st|nd|rd|th)?\s+)?({_MONTH_RE})(?:\s+(\d{{1,2}})(?:st|nd|rd|th)?)?(?:,?\s+((?:19|20)\d\d))?\b",
    re.I,
)
_YEAR = re.compile(r"\b(?:in|of|during)\s+((?:19|20)\d\d)\b", re.I)


def question_periods(question: str) -> list[tuple[int | None, int | None, int | None]]:
    """(year, month, day) periods a question names; None where it leaves a part open."""
    out: list[tuple[int | None, int | None, int | None]] = []
    for m in _DATE.finditer(question):
        day, month, year = m.group(1) or m.group(3), m.group(2).lower(), m.group(4)
        if month == "may" and not (day or year):
            continue  # most likely the verb
        out.append((int(year) if year else None, _MONTHS.index(month) + 1, int(day) if day else None))
    if not out:
        out = [(int(m.group(1)), None, None) for m in _YEAR.finditer(question)]
    return out


def period_bounds(period: tuple[int | None, int | None, int | None], year: int) -> tuple[date, date] | None:
    y, month, day = period
    y = y or year
    try:
        if month is None:
            return date(y, 1, 1), date(y, 12, 31)
        if day is not None:
            return date(y, month, day), date(y, month, day)
        return date(y, month, 1), date(y, month, calendar.monthrange(y, month)[1])
    except ValueError:
        return None


def in_periods(days: np.ndarray, periods: list[tuple[int | None, int | None, int | None]]) -> np.ndarray:
    """Which event days (datetime64[D], NaT for none) fall in (or shortly after) any of the periods."""
    hit = np.zeros(len(days), dtype=bool)
    valid = ~np.isnat(days)
    if not valid.any():
        return hit
    years = sorted({int(str(d)[:4]) for d in np.unique(days[valid])})
    before, after = PERIOD_SLACK
    for p in periods:
        # A month without a year may be any year of the conversation.
        for year in [p[0]] if p[0] else years:
            bounds = period_bounds(p, year)
            if bounds is None:
                continue
            lo, hi = np.datetime64(bounds[0] - before), np.datetime64(bounds[1] + after)
            hit |= valid & (days >= lo) & (days <= hi)
    return hit


# ---- loaded state ------------------------------------------------------------------------------


@dataclass
class LoadedNamespace:
    """One namespace's arrays and the rows retrieval returns, as of one manifest state."""

    stamp: tuple
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)  # level-0, in conversation order
    emb: np.ndarray | None = None
    bm25: Any = None
    tokens: np.ndarray | None = None
    session: np.ndarray | None = None  # session code per level-0 memory
    prev: np.ndarray | None = None  # index of the previous turn of the same session, or -1
    next: np.ndarray | None = None
    speaker: np.ndarray | None = None  # speaker code
    speakers: dict[str, int] = field(default_factory=dict)  # lower-cased name -> code
    days: np.ndarray | None = None
    nodes: dict[int, tuple[list[str], np.ndarray, Any, list[np.ndarray]]] = field(default_factory=dict)
    # level -> (ids, embeddings, bm25, level-0 descendants' positions per node)


def _bm25(texts: list[str]) -> Any:
    index = bm25s.BM25()
    if texts:
        index.index(analyse(texts), show_progress=False)
    return index


def _zscore(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return (x - x.mean()) / sd if sd > 1e-9 else np.zeros_like(x)


def _bm25_scores(index: Any, query: list[str]) -> np.ndarray | None:
    words = [w for w in query if w in getattr(index, "vocab_dict", {})]
    return np.asarray(index.get_scores(words), dtype=np.float64) if words else None


class Retriever:
    """Level-aware hybrid retrieval over one store; holds loaded arrays per namespace."""

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
            raise NamespaceError(
                f"namespace {namespace!r} has no index yet; run `memstage run index --namespace {namespace}`"
            )
        rows = self.store.query(
            """SELECT m.id, m.level, m.text, m.tokens, m.event_ids, m.session, m.event_time, m.speaker, m.parent, m.flag,
                      min(e.seq) AS seq, list(e ORDER BY e.seq) FILTER (WHERE e.id IS NOT NULL) AS events,
                      list(json_extract_string(e.metadata, '$.dia_id')) FILTER (WHERE e.id IS NOT NULL) AS dia_ids
               FROM memories m LEFT JOIN events e ON e.namespace = m.namespace AND list_contains(m.event_ids, e.id)
               WHERE m.namespace = ? AND m.status = 'active' AND m.valid_to IS NULL
               GROUP BY ALL""",
            [namespace],
        ).to_pylist()
        loaded = LoadedNamespace(stamp=stamp, rows={r["id"]: r for r in rows})
        vectors: dict[str, np.ndarray] = {}
        for entry in manifest:
            if entry["kind"] == "dense":
                index = VectorIndex.load(self.store.home / entry["path"])
                vectors.update(zip(index.ids, index.vectors(), strict=True))
        # Level 0 in conversation order (session, turn number): neighbours are adjacent rows.
        level0 = sorted(
            (r for r in rows if r["level"] == 0 and r["id"] in vectors),
            key=lambda r: (r["session"] or "", r["seq"] if r["seq"] is not None else 1 << 30, r["id"]),
        )
        loaded.ids = [r["id"] for r in level0]
        n = len(level0)
        loaded.emb = (
            np.asarray([vectors[i] for i in loaded.ids], dtype=np.float32)
            if n
            else np.zeros((0, 1), np.float32)
        )
        loaded.bm25 = _bm25([index_text(r, r["events"]) for r in level0])
        loaded.tokens = np.asarray([r["tokens"] or 0 for r in level0], dtype=np.int64)
        sessions = {s: k for k, s in enumerate(dict.fromkeys(r["session"] or "" for r in level0))}
        loaded.session = np.asarray([sessions[r["session"] or ""] for r in level0], dtype=np.int64)
        same_prev = np.r_[False, loaded.session[1:] == loaded.session[:-1]] if n else np.zeros(0, bool)
        loaded.prev = np.where(same_prev, np.arange(n) - 1, -1)
        loaded.next = np.where(np.r_[same_prev[1:], False] if n else same_prev, np.arange(n) + 1, -1)
        names = sorted({r["speaker"] for r in level0 if r["speaker"]})
        loaded.speakers = {s.lower(): k for k, s in enumerate(names)}
        loaded.speaker = np.asarray([loaded.speakers.get((r["speaker"] or "").lower(), -1) for r in level0])
        loaded.days = np.asarray(
            [
                np.datetime64(r["event_time"].date()) if r["event_time"] else np.datetime64("NaT")
                for r in level0
            ],
            dtype="datetime64[D]",
        )
        self._load_nodes(loaded, rows, vectors)
        self._loaded[namespace] = loaded
        return loaded

    def _load_nodes(
        self, loaded: LoadedNamespace, rows: list[dict[str, Any]], vectors: dict[str, np.ndarray]
    ) -> None:
        """Level >= 1 nodes with the positions of their level-0 descendants (through `parent` links)."""
        pos = {mid: k for k, mid in enumerate(loaded.ids)}
        by_id = {r["id"]: r for r in rows}
        members: dict[str, list[int]] = {}
        for mid, k in pos.items():
            parent, seen = by_id[mid]["parent"], 0
            while parent and parent in by_id and seen < 8:  # a malformed cycle must not hang a query
                members.setdefault(parent, []).append(k)
                parent, seen = by_id[parent]["parent"], seen + 1
        for level in sorted({r["level"] for r in rows if r["level"] >= 1}):
            nodes = [r for r in rows if r["level"] == level and r["id"] in vectors]
            if not nodes:
                continue
            ids = [r["id"] for r in nodes]
            emb = np.asarray([vectors[i] for i in ids], dtype=np.float32)
            kids = [np.asarray(members.get(i, []), dtype=np.int64) for i in ids]
            loaded.nodes[level] = (ids, emb, _bm25([r["text"] for r in nodes]), kids)

    # ---- scoring -------------------------------------------------------------------------------

    @staticmethod
    def _hybrid(emb: np.ndarray, bm25: Any, qvec: np.ndarray, qwords: list[str]) -> np.ndarray:
        dense = _zscore(emb @ qvec)
        lexical = _bm25_scores(bm25, qwords)
        if lexical is None:
            return dense
        return W_DENSE * dense + (1 - W_DENSE) * _zscore(lexical)

    def score(self, ns: LoadedNamespace, question: str) -> np.ndarray:
        """One score per level-0 memory of `ns` (in `ns.ids` order), higher is better."""
        n = len(ns.ids)
        if n == 0:
            return np.zeros(0)
        qvec = self.encoder.encode([question])[0].astype(np.float32)
        qwords = analyse([question])[0]
        base = self._hybrid(ns.emb, ns.bm25, qvec, qwords)
        for _level, (_ids, emb, bm25, kids) in ns.nodes.items() if HIERARCHY else ():
            node = self._hybrid(emb, bm25, qvec, qwords)
            for k, members in enumerate(kids):
                if len(members):
                    base[members] += HIERARCHY * node[k]
        padded = np.r_[base, base.min()]  # index -1 (no neighbour) reads the minimum
        scores = base + NEIGHBOUR * np.maximum(padded[ns.prev], padded[ns.next])
        # Session score: mean of its best SESSION_TOP turns (after neighbour smoothing).
        order = np.lexsort((-scores, ns.session))
        sess_sorted = ns.session[order]
        starts = np.r_[0, np.flatnonzero(sess_sorted[1:] != sess_sorted[:-1]) + 1]
        rank_in = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
        top = rank_in < SESSION_TOP
        sums = np.bincount(sess_sorted[top], weights=scores[order][top], minlength=ns.session.max() + 1)
        counts = np.bincount(sess_sorted[top], minlength=ns.session.max() + 1)
        scores = scores + SESSION * (sums / np.maximum(counts, 1))[ns.session]
        named = {
            code
            for name, code in ns.speakers.items()
            if re.search(rf"\b{re.escape(name)}\b", question.lower())
        }
        if len(named) == 1:
            scores = scores + SPEAKER * (ns.speaker == next(iter(named)))
        periods = question_periods(question)
        if periods:
            scores = scores + PERIOD * in_periods(ns.days, periods)
        return scores

    def rank(
        self, namespace: str, question: str, *, levels: tuple[int, ...] | None = None
    ) -> list[tuple[str, float]]:
        """Memory ids with scores, best first: level 0 by default; nodes of `levels` >= 1 too when asked."""
        ns = self.load(namespace)
        scores = self.score(ns, question)
        ranked = list(zip(ns.ids, scores.tolist(), strict=True)) if levels is None or 0 in levels else []
        if levels and any(level >= 1 for level in levels):
            # All-levels mode: nodes compete for the budget with their z-scored relevance on the same
            # scale as a turn's hybrid score.
            qvec = self.encoder.encode([question])[0].astype(np.float32)
            qwords = analyse([question])[0]
            for level, (ids, emb, bm25, _kids) in ns.nodes.items():
                if level in levels:
                    ranked += list(zip(ids, self._hybrid(emb, bm25, qvec, qwords).tolist(), strict=True))
        ranked.sort(key=lambda kv: (-kv[1], kv[0]))
        return ranked

    def retrieve(
        self,
        namespace: str,
        question: str,
        budget: int = DEFAULT_BUDGET,
        *,
        levels: tuple[int, ...] | None = None,
    ) -> dict[str, Any]:
        """The retrieval result: memories packed in score order while they fit the budget."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty")
        if budget <= 0:
            raise ValueError(f"budget must be a positive number of tokens, got {budget}")
        start = time.perf_counter()
        ns = self.load(namespace)

        def text_key(item: tuple[str, float]) -> str:
            return " ".join((ns.rows[item[0]]["text"] or "").lower().split())

        chosen, used = pack_within_budget(
            self.rank(namespace, question, levels=levels),
            lambda item: int(ns.rows[item[0]]["tokens"] or 0),
            budget,
            key=text_key,  # a copy of a packed memory adds nothing
        )
        packed = []
        for mid, score in chosen:
            row = ns.rows[mid]
            packed.append(
                {
                    "memory_id": mid,
                    "text": row["text"],
                    "score": round(float(score), 6),
                    "level": int(row["level"]),
                    "tokens": int(row["tokens"] or 0),
                    "event_ids": list(row["event_ids"] or []),
                    "dia_ids": [d for d in (row["dia_ids"] or []) if d],
                    "session": row["session"],
                    "event_time": row["event_time"].isoformat() if row["event_time"] else None,
                    "speaker": row["speaker"],
                    "flag": row["flag"] or "",  # instruction-like (tasks.injection): quoted or held out
                }
            )
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
