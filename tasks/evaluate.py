"""Evaluate: LoCoMo evidence recall of a retriever within token budgets, and the raw-turn baselines.

Recall of one question at one budget = the share of its evidence turns (`dia_id`s) whose own level-0
memory (the memory whose `event_ids` hold that turn's event, original or compressed) is among the
memories the retriever packed. Summaries and topic nodes may be packed, and their tokens count, but
they earn no credit. A long turn's passages (`tasks.passages`) are level-0 memories of that turn, so
packing any one of them credits the turn: credit is per turn, as the evidence is marked (bench/
robustness.py reports a stricter count on its `long` variant, where the passage must hold the
evidence's words). Malformed evidence ids are normalised ("D8:6; D9:17" -> two ids, "D:11:26" ->
"D11:26", "D30:05" -> "D30:5"); ids that name no turn of the conversation are dropped and counted.
A QA entry's optional `question_date` (when it is asked: `tasks.as_of.parse_as_of`'s forms) is
passed to the retriever as `as_of`; one that cannot be read is counted and left out.
Plain functions over a store and a `retrieve(namespace, question, budget) -> result` callable.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import bm25s
import numpy as np

from memstage.stores import queries
from memstage.stores.store import MemoryStore
from memstage.tasks.as_of import known_mask, parse_as_of
from memstage.tasks.retrieve import pack_within_budget

CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}
DEFAULT_BUDGETS = (250, 500, 1000, 2000)
RRF_K = 60
RRF_DEPTH = 100
_DIA = re.compile(r"^D:?(\d+):0*(\d+)$")

Retrieve = Callable[..., dict[str, Any]]  # (namespace, question, budget[, as_of=datetime]) -> result


@dataclass
class Question:
    namespace: str
    question: str
    category: int
    evidence: list[str]  # normalised dia_ids that name a turn of the conversation
    answer: Any = None
    as_of: datetime | None = None  # when the question is asked (its question_date), if given


@dataclass
class Questions:
    items: list[Question] = field(default_factory=list)
    dropped_ids: list[str] = field(default_factory=list)  # "conv-42:D10:19", ...
    without_evidence: int = 0  # category 1-4 questions left out: no usable evidence
    unreadable_dates: int = 0  # question_date values that could not be read (asked without a date)


def normalise_evidence(raw: Iterable[Any], known: set[str]) -> tuple[list[str], list[str]]:
    """(kept, dropped): split strings holding several ids, repair the forms seen, keep ids naming a turn."""
    kept: list[str] = []
    dropped: list[str] = []
    for entry in raw:
        for part in re.split(r"[;,\s]+", str(entry)):
            if not part:
                continue
            m = _DIA.match(part)
            dia = f"D{int(m.group(1))}:{int(m.group(2))}" if m else None
            if dia is None or dia not in known:
                dropped.append(part)
            elif dia not in kept:
                kept.append(dia)
    return kept, dropped


def load_questions(path: Path | str, *, namespace_prefix: str | None = None) -> Questions:
    """Category 1-4 questions with their normalised evidence, per conversation (namespace = sample_id)."""
    samples = json.loads(Path(path).read_text(encoding="utf-8"))
    samples = samples if isinstance(samples, list) else [samples]
    out = Questions()
    for sample in samples:
        sample_id = str(sample.get("sample_id", ""))
        namespace = f"{namespace_prefix}-{sample_id}" if namespace_prefix else sample_id
        conv = sample.get("conversation") or {}
        known = {
            str(turn.get("dia_id"))
            for key, turns in conv.items()
            if re.fullmatch(r"session_\d+", key) and isinstance(turns, list)
            for turn in turns
            if isinstance(turn, dict)
        }
        for qa in sample.get("qa") or []:
            if qa.get("category") not in CATEGORIES:
                continue
            evidence, dropped = normalise_evidence(qa.get("evidence") or [], known)
            out.dropped_ids += [f"{namespace}:{d}" for d in dropped]
            if not evidence:
                out.without_evidence += 1
                continue
            try:
                as_of = parse_as_of(qa.get("question_date"))
            except ValueError:
                as_of, out.unreadable_dates = None, out.unreadable_dates + 1
            out.items.append(
                Question(
                    namespace, str(qa["question"]), int(qa["category"]), evidence, qa.get("answer"), as_of
                )
            )
    return out


def own_memories(store: MemoryStore, namespace: str) -> dict[str, set[str]]:
    """dia_id -> ids of the current level-0 memories that hold that turn's event (its own memory)."""
    return queries.turn_memories(store, namespace)


def question_recall(result: dict[str, Any], evidence: Sequence[str], owns: dict[str, set[str]]) -> float:
    """Share of `evidence` whose own memory is among `result`'s packed memories."""
    packed = {m["memory_id"] for m in result["memories"]}
    return sum(bool(owns.get(d, set()) & packed) for d in evidence) / len(evidence)


def run_questions(
    retrieve: Retrieve,
    questions: Sequence[Question],
    owns: dict[str, dict[str, set[str]]],
    budgets: Sequence[int] = DEFAULT_BUDGETS,
) -> list[dict[str, Any]]:
    """One record per (question, budget): recall, tokens used, latency (ms) of the retrieve call."""
    records = []
    for q in questions:
        for budget in budgets:
            dated = {"as_of": q.as_of} if q.as_of is not None else {}
            start = time.perf_counter()
            result = retrieve(q.namespace, q.question, budget, **dated)
            latency = (time.perf_counter() - start) * 1000
            if result["tokens"] > budget:
                raise AssertionError(f"retriever packed {result['tokens']} tokens into a budget of {budget}")
            records.append(
                {
                    "namespace": q.namespace,
                    "category": q.category,
                    "budget": budget,
                    "recall": question_recall(result, q.evidence, owns[q.namespace]),
                    "tokens": result["tokens"],
                    "latency_ms": latency,
                }
            )
    return records


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per budget: recall overall and per category, mean tokens, latency p50/p95 (keys are strings)."""
    budgets = sorted({r["budget"] for r in records})
    out: dict[str, Any] = {"recall": {}, "by_category": {}, "tokens": {}, "latency_ms": {}}
    for b in budgets:
        rs = [r for r in records if r["budget"] == b]
        key = str(b)
        out["recall"][key] = round(float(np.mean([r["recall"] for r in rs])), 4)
        out["by_category"][key] = {
            CATEGORIES[c]: round(float(np.mean([r["recall"] for r in rs if r["category"] == c])), 4)
            for c in sorted({r["category"] for r in rs})
        }
        out["tokens"][key] = round(float(np.mean([r["tokens"] for r in rs])), 1)
        lat = np.asarray([r["latency_ms"] for r in rs])
        out["latency_ms"][key] = {
            "p50": round(float(np.percentile(lat, 50)), 2),
            "p95": round(float(np.percentile(lat, 95)), 2),
        }
    out["questions"] = len(records) // max(len(budgets), 1)
    return out


# ---- baselines over raw turns ---------------------------------------------------------------------


class RawTurnBaselines:
    """Dense top-k, BM25 and their reciprocal-rank fusion over a namespace's raw turns, packed like memstage.

    A raw turn is `speaker: text` (plus its image caption): the original level-0 text, before any
    stage changed it. Its memory id is `raw-<event id>`, which is the turn's own memory for credit.
    """

    METHODS = ("dense", "bm25", "rrf")

    def __init__(
        self, store: MemoryStore, encoder: Any, count_tokens: Callable[[Sequence[str]], list[int]]
    ) -> None:
        self.store, self.encoder, self.count_tokens = store, encoder, count_tokens
        self._ns: dict[str, dict[str, Any]] = {}
        self._questions: dict[str, np.ndarray] = {}

    def _load(self, namespace: str) -> dict[str, Any]:
        if namespace not in self._ns:
            from memstage.tasks.index import level0_text

            table = self.store.events(namespace)
            events = table.to_pylist()
            texts = [level0_text(e["speaker"], e["text"], json.loads(e["metadata"] or "{}")) for e in events]
            lexical = bm25s.BM25()
            lexical.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
            self._ns[namespace] = {
                "ids": ["raw-" + e["id"] for e in events],
                "dia": [json.loads(e["metadata"] or "{}").get("dia_id") for e in events],
                "emb": self.encoder.encode(texts),
                "tokens": np.asarray(self.count_tokens(texts)),
                "bm25": lexical,
                "times": table.column("event_time").to_numpy(),
            }
        return self._ns[namespace]

    def owns(self, namespace: str) -> dict[str, set[str]]:
        ns = self._load(namespace)
        return {d: {mid} for d, mid in zip(ns["dia"], ns["ids"], strict=True) if d}

    def ranking(self, namespace: str, question: str, method: str) -> list[int]:
        ns = self._load(namespace)
        if question not in self._questions:  # asked once per budget and method: encode it once
            self._questions[question] = self.encoder.encode([question])[0]
        dense = np.argsort(-(ns["emb"] @ self._questions[question]), kind="stable")
        if method == "dense":
            return dense.tolist()
        tokens = bm25s.tokenize([question], stopwords="en", return_ids=False, show_progress=False)[0]
        words = [w for w in tokens if w in ns["bm25"].vocab_dict]
        scores = ns["bm25"].get_scores(words) if words else np.zeros(len(ns["ids"]))
        lexical = [i for i in np.argsort(-scores, kind="stable") if scores[i] > 0]
        if method == "bm25":
            return lexical
        fused: dict[int, float] = {}
        for ranking in (dense[:RRF_DEPTH].tolist(), lexical[:RRF_DEPTH]):
            for rank, i in enumerate(ranking):
                fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank + 1)
        return sorted(fused, key=lambda i: (-fused[i], i))

    def retriever(self, method: str) -> Retrieve:
        if method not in self.METHODS:
            raise ValueError(f"unknown baseline {method!r}; choose one of {self.METHODS}")

        def retrieve(
            namespace: str, question: str, budget: int, as_of: datetime | None = None
        ) -> dict[str, Any]:
            ns = self._load(namespace)
            ranking = self.ranking(namespace, question, method)
            if as_of is not None:  # turns said after the question are not known yet
                known = known_mask(ns["times"], as_of)
                ranking = [i for i in ranking if known[i]]
            chosen, used = pack_within_budget(ranking, lambda i: int(ns["tokens"][i]), budget)
            packed = [{"memory_id": ns["ids"][i], "tokens": int(ns["tokens"][i]), "level": 0} for i in chosen]
            return {
                "namespace": namespace,
                "question": question,
                "budget": budget,
                "tokens": used,
                "memories": packed,
            }

        return retrieve
