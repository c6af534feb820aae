"""Session-diverse packing: the ranked rows re-ordered before packing so the budget spreads over sessions.

The scorer (`tasks.scoring.score_rows`, the same formulas on a card) gives every turn of a good session
part of that session's score and part of its neighbour's, so a question's best rows can cluster in a
few sessions and the greedy packing (`tasks.retrieve.pack_sizes`) spend the budget there, while
evidence of a question that spans sessions (LoCoMo's multi-hop) sits lower: the hypothesis measured. Here a level-0 row's score is lowered
by SESSION_SPREAD for every better-ranked row of its own session (`session_ranks`), and the rows are
packed in the order of these lowered scores (ties keep the scorer's order). The penalty depends only
on a session's own rows, which the index path scores whole (`tasks.candidates.close_sessions`), and
on their order, which the best rows a card sends back keep: the host, device and exhaustive paths
re-order alike. Rows of levels >= 1 are never lowered (they belong to no one session).
SESSION_SPREAD 0 (the default) is the scorer's order: off. Measured (bench/session_diversity.py,
bench/results/session_diversity_cpu.md), chosen leave-one-conversation-out on the dev split, every
fold chose 0; at a fixed 0.1 the dev split's recall at 250/500/1000/2000 falls 0.007/0.018/0.005/0.003
and multi-hop at 1000 from 0.661 to 0.645, while the `ontopic` variant gains 0.018 at 1000. Today's
packing already reaches ~10 sessions a question at 1000 tokens on dev (36 rows); the multi-hop
evidence it misses ranks ~110th (median), below what any re-order of the packed rows reaches. Other
re-orders (a per-session quota, a first pass of one row a session, token shares, MMR by dense
similarity) did no better under the same choice.
"""

from __future__ import annotations

import numpy as np

from memstage.settings import get_settings

SESSION_SPREAD = 0.0  # z units per better row of the same session (0: off); MEMSTAGE_SESSION_SPREAD overrides


def session_spread() -> float:
    """The spread in force: MEMSTAGE_SESSION_SPREAD when set, else SESSION_SPREAD."""
    value = get_settings().session_spread
    return SESSION_SPREAD if value is None else value


def session_ranks(groups: np.ndarray) -> np.ndarray:
    """Per position of a best-first list, how many earlier positions share its group."""
    n = len(groups)
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.r_[0, np.flatnonzero(sorted_groups[1:] != sorted_groups[:-1]) + 1]
    ranks = np.empty(n, np.int64)
    ranks[order] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    return ranks


def spread_order(scores: np.ndarray, groups: np.ndarray, spread: float) -> np.ndarray:
    """Positions of the best-first `scores` in packing order: each score lowered by `spread` per
    better row of its group; a negative group code is a group of its own (never lowered)."""
    n = len(scores)
    if spread <= 0 or n < 2:
        return np.arange(n)
    ranks = np.where(groups < 0, 0, session_ranks(groups))
    return np.argsort(-(np.asarray(scores, np.float64) - spread * ranks), kind="stable")


def session_groups(session: np.ndarray, lv: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A group code per ranked row: its session code at level 0 (`session`: per level-0 row), a
    negative code of its own at levels >= 1."""
    groups = -1 - np.arange(len(rows), dtype=np.int64)
    at0 = lv == 0
    if session is not None and at0.any():
        groups[at0] = np.asarray(session)[rows[at0]]
    return groups


def diverse(
    lv: np.ndarray,
    rows: np.ndarray,
    scores: np.ndarray,
    session: np.ndarray | None,
    spread: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(levels, rows, scores) of a best-first ranking re-ordered for packing (`spread_order`);
    `spread`: SESSION_SPREAD (MEMSTAGE_SESSION_SPREAD) unless given."""
    spread = session_spread() if spread is None else spread
    if spread <= 0 or session is None or len(rows) < 2:
        return lv, rows, scores
    order = spread_order(scores, session_groups(session, lv, rows), spread)
    return lv[order], rows[order], scores[order]
