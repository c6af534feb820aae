"""Fitting the fusion weights (`tasks.fusion`) from labelled questions, across conversations.

- `collect`: for each question, the level-0 rows the real retrieval path scores (`Retriever`'s
  candidates, closed under sessions), their FEATURES, and the label: the row holds an evidence turn
  (one of the question's `dia_id`s);
- `fit_pairwise`: a pairwise linear ranker (logistic regression on feature differences, each
  evidence row against hard negatives, the hand scoring's best non-evidence rows, and random ones;
  every question weighs the same), the weights scaled so that dense + lex = 1 (`tasks.fusion`);
- `loco_folds`: leave one conversation out; a fold never trains on a sample of its held-out
  conversation, in any file (a conversation is its namespace, the same in every robustness variant).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from memstage.gpu.lexical_index import analyse
from memstage.tasks.candidates import candidates
from memstage.tasks.fusion import FEATURES, RowFeatures, combine, hand_weights, row_features
from memstage.tasks.retrieve import Retriever, lexical_finder, search_text
from memstage.tasks.scoring import level_query, scored_words

# The features fitted: all but log_tokens, whose fitted weight came out positive (evidence turns are
# long in LoCoMo) and lowered LOCO recall@1000 (dev 0.861 with it, 0.864 without; bench/fusion_cv.py).
FITTED = tuple(f for f in FEATURES if f != "log_tokens")
PRIOR = 0.01  # L2 pull of the listwise fit towards the hand weights (hand z units)
HARD = 50  # hand-ranked best non-evidence rows paired with each evidence row
RANDOM = 50  # random non-evidence rows paired with each evidence row
C = 1.0  # inverse L2 strength of the logistic regression (on standardised differences)


@dataclass
class Sample:
    """One question's scored rows: features, evidence labels, and the conversation it belongs to."""

    conversation: str
    source: str  # the file it came from ("dev", "padded", ...)
    features: RowFeatures
    labels: np.ndarray  # bool per row


def question_rows(retriever: Retriever, namespace: str, question: str, as_of_day=None):
    """(loaded namespace, candidate rows, level-0 query) exactly as `Retriever.ranked` makes them."""
    ns = retriever.load(namespace)
    searched = search_text(ns, question)
    qvec = np.asarray(retriever.encoder.encode([searched])[0], dtype=np.float32)
    words = analyse([searched])[0]
    scored = scored_words(ns, words, question)
    wanted = {0} | ({1} if retriever.hierarchy else set())
    queries = {
        lvl: level_query(level, qvec, scored if lvl == 0 else words)
        for lvl, level in ns.levels.items()
        if lvl in wanted
    }
    found_by = lexical_finder(ns, queries[0], words, scored)
    rows, _ = candidates(ns, queries, hierarchy=retriever.hierarchy, lexical=found_by)
    return ns, rows, queries[0]


def collect(retriever: Retriever, questions: Iterable, source: str) -> list[Sample]:
    """A Sample per question (`tasks.evaluate.Question`s) that has an evidence row among its rows."""
    from memstage.tasks.as_of import as_of_day

    out: list[Sample] = []
    dia_cache: dict[str, list[set[str]]] = {}
    for q in questions:
        ns, rows, lq = question_rows(retriever, q.namespace, q.question)
        if q.namespace not in dia_cache:
            dia = ns.levels[0].column("dia_ids").to_pylist()
            dia_cache[q.namespace] = [set(d or ()) for d in dia]
        evidence = set(q.evidence)
        labels = np.array([bool(dia_cache[q.namespace][r] & evidence) for r in rows.tolist()], bool)
        if labels.any():
            feats = row_features(ns, rows, lq, q.question, as_of_day(q.as_of))
            out.append(Sample(q.namespace, source, feats, labels))
    return out


def loco_folds(conversations: Iterable[str]) -> list[tuple[str, frozenset[str]]]:
    """(held-out conversation, conversations trained on) for each conversation."""
    convs = sorted(set(conversations))
    folds = [(c, frozenset(convs) - {c}) for c in convs]
    for held, train in folds:
        assert held not in train
    return folds


def fold_samples(samples: Sequence[Sample], train: frozenset[str], held_out: str) -> list[Sample]:
    """The samples a fold trains on: those of `train`'s conversations, none of `held_out`'s."""
    picked = [s for s in samples if s.conversation in train and s.conversation != held_out]
    assert all(s.conversation != held_out for s in picked)
    return picked


def _pairs(sample: Sample, rng: random.Random) -> np.ndarray:
    """Feature differences (evidence row minus non-evidence row) for one question."""
    x, y = sample.features.x, sample.labels
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if len(neg) == 0:
        return np.zeros((0, x.shape[1]))
    hand = combine(sample.features, hand_weights())[neg]
    hard = neg[np.argsort(-hand, kind="stable")[:HARD]]
    rand = np.array(rng.sample(neg.tolist(), min(RANDOM, len(neg))), dtype=np.int64)
    negs = np.unique(np.r_[hard, rand])
    return (x[pos][:, None, :] - x[negs][None, :, :]).reshape(-1, x.shape[1])


def fit_pairwise(
    samples: Sequence[Sample], use: Sequence[str] = FEATURES, seed: int = 0, c: float = C
) -> np.ndarray:
    """Weights over FEATURES (0 for those not in `use`), scaled so that dense + lex = 1."""
    from sklearn.linear_model import LogisticRegression

    if not samples:
        raise ValueError("no samples to fit on")
    rng = random.Random(seed)
    cols = [FEATURES.index(f) for f in use]
    diffs, weights = [], []
    for s in samples:
        d = _pairs(s, rng)[:, cols]
        if len(d):
            diffs.append(d)
            weights.append(np.full(len(d), 1.0 / len(d)))
    d, w = np.concatenate(diffs), np.concatenate(weights)
    sd = d.std(axis=0)
    sd[sd < 1e-9] = 1.0
    x = np.r_[d / sd, -d / sd]
    y = np.r_[np.ones(len(d)), np.zeros(len(d))]
    model = LogisticRegression(C=c, fit_intercept=False, max_iter=1000)
    model.fit(x, y, sample_weight=np.r_[w, w] * len(samples))
    out = np.zeros(len(FEATURES))
    out[cols] = model.coef_[0] / sd
    return _relevance_scaled(out)


def _listwise_loss(w: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]):
    """Weighted mean over questions of -log(softmax mass on the evidence rows), and its gradient."""
    loss, grad, total = 0.0, np.zeros_like(w), 0.0
    for x, y, offset, weight in parts:
        s = x @ w + offset
        all_lse, pos_lse = logsumexp(s), logsumexp(s[y])
        loss += weight * (all_lse - pos_lse)
        grad += weight * (np.exp(s - all_lse) @ x - np.exp(s[y] - pos_lse) @ x[y])
        total += weight
    return loss / total, grad / total


def file_weights(samples: Sequence[Sample], per_file: Mapping[str, float] | None = None) -> np.ndarray:
    """A weight per sample so that each file (`Sample.source`) weighs `per_file[source]` (1 when not
    named) in all, shared equally by its questions: a file of many questions does not drown the others."""
    counts = Counter(s.source for s in samples)
    per_file = per_file or {}
    for source, weight in per_file.items():
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"file weight for {source!r} must be finite and >= 0, got {weight!r}")
    return np.array([per_file.get(s.source, 1.0) / counts[s.source] for s in samples], dtype=np.float64)


def fit_listwise(
    samples: Sequence[Sample],
    use: Sequence[str] = FITTED,
    prior: float = PRIOR,
    weights: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Weights over FEATURES (0 for those not in `use`) minimising the softmax cross-entropy of each
    question's evidence rows among its scored rows (each question weighing `weights[i]`, all alike
    when None), plus `prior` * ||w - hand||^2 (so a weight the data does not move stays at its hand
    value); scaled so that dense + lex = 1."""
    if not samples:
        raise ValueError("no samples to fit on")
    from memstage.tasks import scoring

    qw = np.ones(len(samples)) if weights is None else np.asarray(weights, dtype=np.float64)
    if qw.shape != (len(samples),) or not np.isfinite(qw).all() or (qw < 0).any():
        raise ValueError("weights must be one finite, non-negative number per sample")
    cols = np.array([FEATURES.index(f) for f in use])
    hand = hand_weights()
    parts = [
        (s.features.x[:, cols], s.labels, scoring.SPEAKER_SESSION * s.features.took_part, float(w))
        for s, w in zip(samples, qw, strict=True)
        if s.labels.any() and w > 0
    ]
    if not parts:
        raise ValueError("no sample with evidence and a positive weight")

    def objective(wc: np.ndarray) -> tuple[float, np.ndarray]:
        loss, grad = _listwise_loss(wc, parts)
        d = wc - hand[cols]
        return loss + prior * float(d @ d), grad + 2 * prior * d

    result = minimize(objective, hand[cols], jac=True, method="L-BFGS-B")
    out = np.zeros(len(FEATURES))
    out[cols] = result.x
    return _relevance_scaled(out)


def _relevance_scaled(w: np.ndarray) -> np.ndarray:
    mix = w[FEATURES.index("dense")] + w[FEATURES.index("lex")]
    if mix <= 1e-9:
        raise ValueError(
            f"fitted relevance weights do not rank by relevance: {dict(zip(FEATURES, w, strict=True))}"
        )
    return w / mix
