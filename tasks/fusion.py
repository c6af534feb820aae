"""Fusion features: the per-row signals `tasks.scoring.score_rows` mixes by hand, as a matrix, and a
linear scorer over them, so the mixing weights can be fitted (`tasks.fusion_fit`) instead of set.

One row per scored level-0 row, columns FEATURES (all vectorised numpy over the question's rows):
- `dense`, `lex`: the dense and BM25 z-scores (z over the whole level, as `scoring.hybrid`); a
  question with no word in the vocabulary reads `lex = dense` (the hand mix then scores it by
  dense alone, as `hybrid` does);
- `neighbour`: the better adjacent turn's hand hybrid score (its turn's best passage;
  `scoring.NO_NEIGHBOUR` without one), `session`: the mean of the session's SESSION_TOP best
  (hybrid + NEIGHBOUR * neighbour) scores, both from the hand mix, as `score_rows` computes them;
- `speaker`: the row is by the one participant the question names, `period`: its event time falls in
  a period the question names, `rest`: a passage of a long turn other than the turn's best;
- `log_tokens`: log(1 + the memory's tokens), which the hand scoring ignores (a long turn that ranks
  early takes the budget of several short ones).
The sessions a named participant took part in keep the hand boost (`scoring.SPEAKER_SESSION`, not a
column): within one conversation it moves every row alike, so it cannot be learned from LoCoMo's
pairs, and across many conversations it is almost a filter (bench/scale.py). The fitted weights are
scaled so that dense + lex = 1, the hand mix's z units, so that boost means what it means by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np

from memstage.tasks import scoring
from memstage.tasks.scoring import (
    LevelQuery,
    _neighbour,
    _z,
    day_ranges,
    days_in,
    named_in,
    question_periods,
    relative_periods,
    session_scores,
    turn_groups,
    turn_max,
    years_of,
)

FEATURES = ("dense", "lex", "neighbour", "session", "speaker", "period", "rest", "log_tokens")


@dataclass
class RowFeatures:
    """The features of one question's rows, and the hand boost of the named participants' sessions."""

    x: np.ndarray  # (rows, len(FEATURES)) float64
    took_part: np.ndarray  # (rows,) the row's session has a turn by a participant the question names


def hand_weights() -> np.ndarray:
    """The hand scoring as a weight vector over FEATURES (read from `tasks.scoring` at call time)."""
    w = {
        "dense": scoring.W_DENSE,
        "lex": 1 - scoring.W_DENSE,
        "neighbour": scoring.NEIGHBOUR,
        "session": scoring.SESSION,
        "speaker": scoring.SPEAKER,
        "period": scoring.PERIOD,
        "rest": scoring.PASSAGE_REST,
        "log_tokens": 0.0,
    }
    return np.array([w[f] for f in FEATURES], dtype=np.float64)


def _relevance(level: Any, q: LevelQuery, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dense z, lex z) of `rows`, z over the whole level as `scoring.hybrid`."""
    cos = np.vecdot(level.vectors(rows), q.qvec)
    dense = _z(cos.astype(np.float64), q.dense_mean, q.dense_sd)
    if not q.has_words:
        return dense, dense
    at = np.minimum(np.searchsorted(q.lex_rows, rows), max(len(q.lex_rows) - 1, 0))
    hit = (q.lex_rows[at] == rows) if len(q.lex_rows) else np.zeros(len(rows), bool)
    lex = np.where(hit, q.lex_vals[at] if len(q.lex_vals) else 0.0, 0.0).astype(np.float64)
    return dense, _z(lex, q.lex_mean, q.lex_sd)


def _cues(ns: Any, rows: np.ndarray, question: str, today: date | None) -> tuple[np.ndarray, ...]:
    """(by the one named participant, in a named participant's session, in a named period) per row."""
    n = len(rows)
    named = named_in(ns, question)
    speaker, took_part = np.zeros(n), np.zeros(n, bool)
    if named:
        by_named = np.isin(np.asarray(ns.speaker[rows]), list(named))
        _, inverse = np.unique(np.asarray(ns.session[rows]), return_inverse=True)
        took_part = np.bincount(inverse, weights=by_named)[inverse] > 0
        speaker = by_named.astype(np.float64) if len(named) == 1 else speaker
    period = np.zeros(n)
    periods, relative = question_periods(question), relative_periods(question, today)
    if periods or relative:
        days = np.asarray(ns.days[rows])
        period = days_in(days, day_ranges(periods, relative, years_of(days))).astype(np.float64)
    return speaker, took_part, period


def row_features(
    ns: Any, rows: np.ndarray, q: LevelQuery, question: str, today: date | None = None
) -> RowFeatures:
    """FEATURES of level-0 `rows` (sorted, unique) for one question; like `score_rows`, a row's
    features depend only on its session's rows."""
    if len(rows) == 0:
        return RowFeatures(np.zeros((0, len(FEATURES))), np.zeros(0, bool))
    dense, lex = _relevance(ns.levels[0], q, rows)
    base = scoring.W_DENSE * dense + (1 - scoring.W_DENSE) * lex
    turn = turn_groups(ns, rows)
    whole = turn_max(turn, base) if scoring.TURN_NEIGHBOUR else base
    neighbour = np.maximum(_neighbour(rows, ns.prev, whole), _neighbour(rows, ns.next, whole))
    structural = base + scoring.NEIGHBOUR * neighbour
    session = session_scores(np.asarray(ns.session[rows]), structural)
    rest = (base < turn_max(turn, base)).astype(np.float64)
    speaker, took_part, period = _cues(ns, rows, question, today)
    log_tokens = np.log1p(np.asarray(ns.levels[0].tokens[rows], dtype=np.float64))
    x = np.column_stack([dense, lex, neighbour, session, speaker, period, rest, log_tokens])
    return RowFeatures(x, took_part)


def combine(f: RowFeatures, weights: np.ndarray) -> np.ndarray:
    """A linear score over the features plus the hand boost of the named participants' sessions."""
    return f.x @ np.asarray(weights, dtype=np.float64) + scoring.SPEAKER_SESSION * f.took_part


def scorer(weights: np.ndarray) -> Any:
    """A drop-in for `scoring.score_rows` that scores by `weights` over FEATURES."""

    def score_rows(
        ns: Any, rows: np.ndarray, q: LevelQuery, question: str, today: date | None = None
    ) -> np.ndarray:
        return combine(row_features(ns, rows, q, question, today), weights)

    return score_rows
