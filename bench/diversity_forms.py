"""Re-orderings of a question's ranked rows before packing, compared by bench/session_diversity.py.

Each form maps (replayed question, its namespace's level-0 vectors, parameter, budget) to the order in
which the ranked rows are packed (positions, best first); parameter 0 (or the first of its grid) is
the scorer's order for every form but `quota` (whose grid holds (Q, penalty) pairs). Every form has
one or two parameters, given by its grid:
- `spread` (`tasks.diversity`, the one in memstage): the score lowered per better row of the session;
- `first`: every row but its session's best lowered by a constant (a first pass of one row a session);
- `quota`: rows past the Q best of their session lowered by a constant (a per-session quota);
- `sqrt`: the score lowered by the square root of the better rows of the session;
- `tokens`: lowered per 100 tokens of better rows of the session;
- `share`: lowered by a constant once the better rows of the session hold 25% of the budget;
- `mmr`: maximal marginal relevance over the best MMR_WINDOW rows: each next row is the best by score
  minus the parameter times its highest cosine to a row already ordered (dense similarity, not session).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from memstage.tasks import diversity

MMR_WINDOW = 200


def _lowered(r: Any, penalty: np.ndarray) -> np.ndarray:
    return np.argsort(-(np.asarray(r.scores, np.float64) - penalty), kind="stable")


def tokens_before(r: Any) -> np.ndarray:
    """Per row, the tokens of the better rows of its session."""
    order = np.argsort(r.groups, kind="stable")
    g, sizes = r.groups[order], r.sizes[order]
    cum = np.cumsum(sizes) - sizes
    starts = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    before = np.empty(len(g))
    before[order] = cum - np.repeat(cum[starts], np.diff(np.r_[starts, len(g)]))
    return before


def mmr(r: Any, vecs: dict[str, np.ndarray], lam: float) -> np.ndarray:
    n = len(r.scores)
    w = min(MMR_WINDOW, n)
    if lam <= 0 or w < 2:
        return np.arange(n)
    v = vecs[r.conversation][r.rows[:w]]
    sim, s = v @ v.T, np.asarray(r.scores[:w], np.float64)
    maxsim, left, order = np.zeros(w), np.ones(w, bool), []
    for _ in range(w):
        j = int(np.argmax(np.where(left, s - lam * maxsim, -np.inf)))
        order.append(j)
        left[j] = False
        maxsim = np.maximum(maxsim, sim[j])
    return np.r_[np.array(order, np.int64), np.arange(w, n)]


def order(form: str, r: Any, vecs: dict[str, np.ndarray], p: Any, budget: int) -> np.ndarray:
    ranks = diversity.session_ranks(r.groups)
    if form == "spread":
        return diversity.spread_order(r.scores, r.groups, p)
    if form == "first":
        return _lowered(r, p * np.minimum(ranks, 1))
    if form == "quota":
        return _lowered(r, p[1] * (ranks >= p[0]))
    if form == "sqrt":
        return _lowered(r, p * np.sqrt(ranks))
    if form == "tokens":
        return _lowered(r, p * tokens_before(r) / 100.0)
    if form == "share":
        return _lowered(r, p * (tokens_before(r) >= 0.25 * budget))
    if form == "mmr":
        return mmr(r, vecs, p)
    raise ValueError(form)


FORMS: dict[str, tuple[Any, ...]] = {
    "spread": (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0),
    "first": (0.0, 0.05, 0.1, 0.2, 0.3, 0.5),
    "quota": ((0, 0.0), (3, 0.1), (3, 0.3), (5, 0.1), (5, 0.5), (8, 0.5), (8, 2.0), (12, 2.0)),
    "sqrt": (0.0, 0.05, 0.1, 0.2, 0.4),
    "tokens": (0.0, 0.02, 0.05, 0.1, 0.2),
    "share": (0.0, 0.25, 0.5, 1.0, 2.0),
    "mmr": (0.0, 0.25, 0.5, 1.0, 2.0),
}
BUDGET_DEPENDENT = {"share"}
