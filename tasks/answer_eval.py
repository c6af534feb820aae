"""Answer accuracy on LoCoMo: the benchmark's token F1 of generated answers, beside an extractive baseline.

The measure follows LoCoMo's own evaluation (snap-research/locomo, task_eval/evaluation.py): answers
are lower-cased, stripped of punctuation, articles and "and", stemmed (Porter, from PyStemmer when it
is installed, else `tasks.retrieve.stem`), and scored by token F1 against the gold answer;
multi-hop questions (category 1) split both on commas and average the best match of each gold part;
open-domain gold answers (category 3) keep their first ";" part.
The extractive baseline answers with the sentence of the top-scored retrieved memory that shares the
most words with the question (speaker tag removed): what a reader gets without a generator.
Plain functions over a retrieve callable and an answer callable.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from memstage.tasks.evaluate import CATEGORIES, Question

_ARTICLES = re.compile(r"\b(a|an|the|and)\b")
_WORD = re.compile(r"[a-z0-9]+")
_STOP = set(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "of",
        "to",
        "in",
        "on",
        "at",
        "for",
        "with",
        "by",
        "from",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "do",
        "does",
        "did",
        "what",
        "when",
        "where",
        "who",
        "whom",
        "which",
        "why",
        "how",
        "that",
        "this",
        "these",
        "those",
        "it",
        "its",
        "his",
        "her",
        "their",
        "they",
        "them",
        "he",
        "she",
        "you",
        "your",
        "i",
        "my",
        "me",
        "we",
        "our",
        "has",
        "have",
        "had",
        "will",
        "would",
        "can",
        "could",
        "should",
    ]
)


def _stemmer() -> tuple[str, Callable[[str], str]]:
    try:
        import Stemmer

        porter = Stemmer.Stemmer("porter")
        return "porter (PyStemmer)", porter.stemWord
    except ImportError:
        from memstage.tasks.retrieve import stem

        return "memstage light suffix stripper (PyStemmer not installed)", stem


STEMMER, _stem = _stemmer()


def normalise(text: Any) -> list[str]:
    text = str(text).replace(",", "").lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return [_stem(w) for w in _ARTICLES.sub(" ", text).split()]


def token_f1(prediction: Any, gold: Any) -> float:
    pred, ref = normalise(prediction), normalise(gold)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def locomo_f1(prediction: Any, gold: Any, category: int) -> float:
    """LoCoMo's answer F1 for one question of `category`."""
    prediction, gold = str(prediction), str(gold)
    if category == 3:
        gold = gold.split(";")[0]
    if category == 1:
        preds = [p.strip() for p in prediction.split(",")]
        return float(np.mean([max(token_f1(p, g.strip()) for p in preds) for g in gold.split(",")]))
    return token_f1(prediction, gold)


def _content(text: str) -> set[str]:
    return {_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP}


def extractive_answer(retrieval: dict[str, Any]) -> str:
    """The sentence of the top-scored memory that shares most content words with the question."""
    memories = list(retrieval.get("memories") or [])
    if not memories:
        return ""
    top = max(memories, key=lambda m: m.get("score") or 0.0)
    text = re.sub(r"^[^:\n]{1,40}: ", "", str(top.get("text") or ""))
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()] or [text]
    words = _content(str(retrieval.get("question") or ""))
    return max(sentences, key=lambda s: (len(_content(s) & words), -sentences.index(s)))


def evaluate_answers(
    questions: Sequence[Question],
    retrieve: Callable[[str, str, int], dict[str, Any]],
    answer: Callable[[dict[str, Any]], dict[str, Any]],
    budget: int,
) -> dict[str, Any]:
    """Generator and extractive F1, overall and by category, over `questions` at `budget`."""
    rows = []
    for q in questions:
        retrieval = retrieve(q.namespace, q.question, budget)
        generated = answer(retrieval)
        text = str(generated.get("answer") or "")
        extract = extractive_answer(retrieval)
        rows.append(
            {
                "category": q.category,
                "question": q.question,
                "gold": q.answer,
                "answer": text,
                "extractive": extract,
                "f1": locomo_f1(text, q.answer, q.category),
                "extractive_f1": locomo_f1(extract, q.answer, q.category),
                "unknown": text.lower().startswith("i don't know"),
            }
        )
    return summarise_answers(rows, budget)


def summarise_answers(rows: Sequence[dict[str, Any]], budget: int) -> dict[str, Any]:
    def mean(key: str, rs: Sequence[dict[str, Any]]) -> float:
        return round(float(np.mean([r[key] for r in rs])), 4) if rs else 0.0

    cats = sorted({r["category"] for r in rows})
    return {
        "budget": budget,
        "questions": len(rows),
        "f1": mean("f1", rows),
        "extractive_f1": mean("extractive_f1", rows),
        "unknown_share": mean("unknown", rows),
        "by_category": {
            CATEGORIES[c]: {
                "questions": sum(r["category"] == c for r in rows),
                "f1": mean("f1", [r for r in rows if r["category"] == c]),
                "extractive_f1": mean("extractive_f1", [r for r in rows if r["category"] == c]),
            }
            for c in cats
        },
        "stemmer": STEMMER,
        "examples": [
            {k: r[k] for k in ("question", "gold", "answer", "extractive", "f1", "extractive_f1")}
            for r in rows[:8]
        ],
    }


def spread(questions: Sequence[Question], limit: int | None) -> list[Question]:
    """At most `limit` questions taken evenly across the list (every conversation and category), in order."""
    if not limit or limit >= len(questions):
        return list(questions)
    step = len(questions) / limit
    return [questions[int(k * step)] for k in range(limit)]
