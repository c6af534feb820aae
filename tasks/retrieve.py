"""Retrieve: a question in, the best evidence that fits a token budget out.

A `Retriever` keeps each namespace's artifacts memory-mapped (`tasks.candidates.load_namespace`) and
reloads them only when the index stage has written a new version. Per question: the encoder embeds
it (a name the turns call a speaker by, "Caroline" for `user`, said as the speaker's label:
`search_text`); `tasks.candidates` picks the level-0 rows worth scoring from the dense, lexical and
hierarchy indexes and closes them under sessions; `tasks.scoring` scores them (hybrid relevance
z-normalised over the whole namespace, neighbour and session passes, question cues). Memories are
then packed in score order while they fit the budget (counted with the generator's tokenizer;
`tasks.packing`), no sentence packed twice (`tasks.repeats`). Where level 0 sits on a CUDA card
(`tasks.scoring_device`), every level-0 row is scored there instead, and the best
`rows_for(budget)` come back for packing. `exhaustive=True` scores every level-0 row instead (the
reference the index path is measured against: `memstage eval locomo` reports both). With `levels` asking for levels >= 1, the consolidate stage's nodes compete for the
budget too, by their hybrid score. `as_of` (when the question is asked): memories whose event time
is after it are not packed, and its day reaches the scorer (relative periods: "last month", "two
weeks ago").
"""

from __future__ import annotations

import dataclasses
import re
import time
from datetime import datetime
from typing import Any

import numpy as np

from memstage.defaults import DEFAULT_BUDGET
from memstage.gpu.lexical_index import analyse
from memstage.settings import get_settings
from memstage.stores.store import MemoryStore, NamespaceError, validate_namespace
from memstage.tasks import diversity, scoring, scoring_device
from memstage.tasks.as_of import as_of_day, known_mask
from memstage.tasks.candidates import LoadedNamespace, best_nodes, candidates, load_namespace
from memstage.tasks.excerpt import Excerpts, density_order
from memstage.tasks.packing import MIN_LEFT, PACK_WINDOW, pack_ranked, pack_sizes, pack_within_budget
from memstage.tasks.scoring import (
    LevelQuery,
    hybrid,
    in_periods,
    level_query,
    question_periods,
    score_rows,
    scored_words,
)

__all__ = [
    "DEFAULT_BUDGET",
    "Retriever",
    "analyse",
    "MIN_LEFT",
    "PACK_WINDOW",
    "in_periods",
    "pack_sizes",
    "pack_within_budget",
    "question_periods",
]

K_LEVEL_NODES = 200  # nodes per level >= 1 that compete for the budget when `levels` asks for them


def search_text(ns: LoadedNamespace, question: str) -> str:
    """The question as the indexes are searched with: a name the turns call a speaker by
    (`ns.aliases`: "Caroline" for `user`) is replaced by the speaker's label, since a turn is found by
    `label: text` (`tasks.index.index_text`), as a question naming a speaker by the label would be."""
    if not ns.aliases or not scoring.SPEAKER_NAMES:
        return question
    labels = {code: name for name, code in ns.speakers.items()}
    return alias_pattern(ns).sub(lambda m: labels[ns.aliases[m.group(1).lower()]], question)


def alias_pattern(ns: LoadedNamespace) -> re.Pattern[str]:
    """One alternation of the namespace's aliases, compiled once per loaded namespace (compiling
    it per question grows with the namespace's speakers)."""
    key = (id(ns.aliases), len(ns.aliases))  # not the sorted names: that sort was per question
    cached = getattr(ns, "_alias_pattern", None)
    if cached is None or cached[0] != key:
        alternatives = "|".join(re.escape(a) for a in sorted(ns.aliases, key=len, reverse=True))
        cached = (key, re.compile(r"\b(" + alternatives + r")\b", re.I))
        ns._alias_pattern = cached  # type: ignore[attr-defined]
    return cached[1]


def lexical_finder(ns: LoadedNamespace, q: LevelQuery, words: list[str], scored: list[str]) -> LevelQuery:
    """The level-0 query whose BM25 top rows are candidates: every word of the question (a named
    speaker's name, rare in a namespace of many people, finds their turns), while rows are scored
    without the names (`scoring.scored_words`); the names' posting lists added to `q`'s scores."""
    if scored == words:
        return q
    extra = [w for w in words if w not in scored]
    rows, vals = ns.levels[0].lexical.plus_words(q.lex_rows, q.lex_vals, extra)
    return dataclasses.replace(q, lex_rows=rows, lex_vals=vals)


class Retriever:
    """Index-backed hybrid retrieval over one store; holds memory-mapped artifacts per namespace."""

    def __init__(
        self,
        store: MemoryStore,
        encoder: Any,
        token_counter: Any | None = None,
        *,
        exhaustive: bool = False,
        hierarchy: bool = True,
        backend: str | None = None,
        excerpt_words: int | None = None,
        density: float = 0.0,
        drop_repeats: bool | None = None,
    ) -> None:
        self.store = store
        # a sentence already packed is not packed again (`tasks.repeats`); None: MEMSTAGE_DROP_REPEATS
        self.drop_repeats = get_settings().drop_repeats if drop_repeats is None else drop_repeats
        # a packed level-0 memory of more than this many words is cut to its sentences nearest the
        # question (`tasks.excerpt`); 0: packed whole; None: MEMSTAGE_EXCERPT_WORDS. Needs
        # `token_counter` (the excerpt's tokens are counted with it).
        self.excerpt_words = get_settings().excerpt_words if excerpt_words is None else excerpt_words
        # > 0: near-ties broken by score per token (`tasks.excerpt.density_order`; lost on dev, a bench option)
        self.density = density
        self.encoder = encoder
        self.token_counter = token_counter
        self.exhaustive = exhaustive
        self.hierarchy = hierarchy
        self.backend = backend
        self.last_figures: dict[str, int] = {}
        self._loaded: dict[str, LoadedNamespace] = {}

    # ---- loading -------------------------------------------------------------------------------

    def _stamp(self, namespace: str) -> tuple:
        # The index stage writes a new version folder (and removes old ones) on every change, which
        # changes the folder's mtime: a stat per question instead of a database read.
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
        folder = (self.store.home / manifest[0]["path"]).parent
        loaded = load_namespace(folder, stamp, self.backend)
        asking = getattr(self.encoder, "name", None)
        if loaded.model and asking and loaded.model != asking:
            raise NamespaceError(
                f"namespace {namespace!r} was indexed with the embedding model {loaded.model!r}, and "
                f"questions here are embedded with {asking!r}: set MEMSTAGE_ENCODER_MODEL as when it was "
                "indexed"
            )
        self._loaded[namespace] = loaded
        return loaded

    # ---- ranking -------------------------------------------------------------------------------

    def searched(self, namespace: str, question: str) -> str:
        """The question as the namespace's indexes are searched with (`search_text`); the question
        itself when the namespace cannot be loaded (its retrieval reports why)."""
        try:
            return search_text(self.load(namespace), question)
        except (NamespaceError, ValueError, OSError):
            return question

    def ranked(
        self,
        ns: LoadedNamespace,
        question: str,
        levels: tuple[int, ...] | None = None,
        as_of: datetime | None = None,
        qvec: np.ndarray | None = None,
        budget: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(levels, rows, scores), best first: scored level-0 rows, and nodes of `levels` >= 1 when
        asked; with `as_of`, only memories known then. `qvec`: the embedding of
        `search_text(ns, question)` (`searched`), when the caller already made it (serve's batches do).
        `budget`: the tokens the rows will be packed into (level 0 scored on a device sends back
        `scoring_device.rows_for(budget)` rows)."""
        if ns.n == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        searched = search_text(ns, question)
        if qvec is None:
            qvec = self.encoder.encode([searched])[0]
        qvec = np.asarray(qvec, dtype=np.float32)
        words = analyse([searched])[0]
        scored = scored_words(ns, words, question)
        on_device = ns.device is not None  # level 0 is scored there: no host query for it (O(n) BM25)
        wanted = set(levels or (0,)) - ({0} if on_device else set())
        if self.hierarchy and not self.exhaustive and not on_device:
            wanted.add(1)  # the hierarchy is a candidate source
        queries = {
            lvl: level_query(level, qvec, scored if lvl == 0 else words)
            for lvl, level in ns.levels.items()
            if lvl in wanted
        }
        parts: list[tuple[int, np.ndarray, np.ndarray]] = []
        if levels is None or 0 in levels:
            parts.append((0, *self._level0(ns, queries, qvec, (words, scored), question, as_of, budget)))
        for lvl in sorted(set(levels or ()) - {0}):
            if lvl in ns.levels:
                level = ns.levels[lvl]
                if self.exhaustive:
                    rows = np.arange(len(level))
                    parts.append((lvl, rows, hybrid(level, queries[lvl], rows)))
                else:
                    parts.append((lvl, *best_nodes(level, queries[lvl], K_LEVEL_NODES)))
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        lv = np.concatenate([np.full(len(r), lvl) for lvl, r, _ in parts])
        rows = np.concatenate([r for _, r, _ in parts])
        scores = np.concatenate([s for _, _, s in parts])
        if not (len(parts) == 1 and on_device):  # the device's rows come best first, ties by row
            order = np.lexsort((rows, lv, -scores))
            lv, rows, scores = lv[order], rows[order], scores[order]
        if as_of is not None:
            keep = np.zeros(len(rows), bool)
            for lvl in np.unique(lv).tolist():
                at = lv == lvl
                keep[at] = known_mask(ns.levels[lvl].column("event_time"), as_of)[rows[at]]
            lv, rows, scores = lv[keep], rows[keep], scores[keep]
        return lv, rows, scores

    def _level0(
        self,
        ns: LoadedNamespace,
        queries: dict[int, LevelQuery],
        qvec: np.ndarray,
        words: tuple[list[str], list[str]],
        question: str,
        as_of: datetime | None,
        budget: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 rows and their scores: every row on the device, when level 0 is there; else every
        row (`exhaustive`) or the indexes' candidates, scored on the host. `words`: (all, scored)."""
        if ns.device is not None:
            self.last_figures = {"scored": ns.n, "device": 1}
            k = scoring_device.rows_for(budget)
            return scoring_device.top_rows(ns, qvec, words[1], question, as_of_day(as_of), k)
        if self.exhaustive:
            rows, self.last_figures = np.arange(ns.n), {"scored": ns.n}
        else:
            found_by = lexical_finder(ns, queries[0], *words)
            rows, self.last_figures = candidates(ns, queries, hierarchy=self.hierarchy, lexical=found_by)
        return rows, score_rows(ns, rows, queries[0], question, as_of_day(as_of))

    def rank(
        self,
        namespace: str,
        question: str,
        *,
        levels: tuple[int, ...] | None = None,
        as_of: datetime | None = None,
    ) -> list[tuple[str, float]]:
        """Memory ids with scores, best first (the scored ones: candidates, or all with `exhaustive`)."""
        ns = self.load(namespace)
        lv, rows, scores = self.ranked(ns, question, levels, as_of)
        ids = {lvl: ns.levels[lvl].column("id") for lvl in ns.levels}
        return [
            (ids[lvl][row].as_py(), score)
            for lvl, row, score in zip(lv.tolist(), rows.tolist(), scores.tolist(), strict=True)
        ]

    def retrieve(
        self,
        namespace: str,
        question: str,
        budget: int = DEFAULT_BUDGET,
        *,
        levels: tuple[int, ...] | None = None,
        as_of: datetime | None = None,
        qvec: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """The retrieval result: memories packed in score order while they fit the budget (of those
        known at `as_of`, when given). `qvec`: as `ranked` takes it."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty")
        if budget <= 0:
            raise ValueError(f"budget must be a positive number of tokens, got {budget}")
        start = time.perf_counter()
        ns = self.load(namespace)
        texts = {lvl: level.column("text") for lvl, level in ns.levels.items()}
        lv, rows, scores = self.ranked(ns, question, levels, as_of, qvec, budget)
        lv, rows, scores = diversity.diverse(lv, rows, scores, ns.session)  # packing order
        sizes = np.zeros(len(rows), np.int64)
        for lvl in np.unique(lv).tolist():
            sizes[lv == lvl] = ns.levels[lvl].tokens[rows[lv == lvl]]

        if self.density > 0 and len(rows):
            lv, rows, scores, sizes = density_order(lv, rows, scores, sizes, per_doubling=self.density)
        cuts = None  # long memories cut to the run of sentences nearest the question (`tasks.excerpt`)
        if self.excerpt_words and self.token_counter is not None and len(rows):
            words = scored_words(ns, analyse([search_text(ns, question)])[0], question)
            cuts = Excerpts(ns, lv, rows, sizes, words, self.token_counter, self.excerpt_words)
        picked, used, marks = pack_ranked(
            lambda j: texts[int(lv[j])][int(rows[j])].as_py() or "",
            sizes,
            budget,
            cuts=cuts,
            drop_repeats=self.drop_repeats,
            counter=self.token_counter,
        )
        chosen = [(int(lv[j]), int(rows[j]), float(scores[j])) for j in picked]
        memories = self._memories(ns, chosen)
        for shortened in marks:
            shortened.mark(picked, memories)
        return {
            "namespace": namespace,
            "question": question,
            "budget": budget,
            "tokens": used,
            "memories": memories,
            **({"as_of": as_of.isoformat()} if as_of is not None else {}),
            "latency_ms": round((time.perf_counter() - start) * 1000, 2),
        }

    @staticmethod
    def _memories(ns: LoadedNamespace, chosen: list[tuple[int, int, float]]) -> list[dict[str, Any]]:
        """The packed memories as dicts, in packing order: one `take` per level, not a slice per row."""
        rows: dict[tuple[int, int], dict[str, Any]] = {}
        for lvl in {lvl for lvl, _, _ in chosen}:
            picked = [row for level, row, _ in chosen if level == lvl]
            rows.update(zip([(lvl, r) for r in picked], ns.levels[lvl].take(picked), strict=True))
        return [Retriever._memory(rows[(lvl, row)], score) for lvl, row, score in chosen]

    @staticmethod
    def _memory(r: dict[str, Any], score: float) -> dict[str, Any]:
        return {
            "memory_id": r["id"],
            "text": r["text"],
            "score": round(float(score), 6),
            "level": int(r["level"]),
            "tokens": int(r["tokens"] or 0),
            "event_ids": list(r["event_ids"] or []),
            "dia_ids": [d for d in (r["dia_ids"] or []) if d],
            "session": r["session"],
            "event_time": r["event_time"].isoformat() if r["event_time"] else None,
            "speaker": r["speaker"],
            "flag": r["flag"] or "",  # instruction-like (tasks.injection): quoted or held out
        }
