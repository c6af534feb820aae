"""Topic windows: a long turn's sentences grouped into passages cut where the topic changes (a
TextTiling-like rule over sentence embeddings), instead of every WINDOW_WORDS words (`tasks.passages`).

At each gap between consecutive sentences, `gap_similarity` is the cosine between the mean vector of
the BLOCK sentences before it and of the BLOCK after it; `depth` is TextTiling's depth score: how far
the similarity falls at the gap from the nearest peak on each side, summed. `cuts` then chooses the
passages by dynamic programming: a cut costs (the turn's threshold - its gap's depth), the threshold
being the valleys' mean depth less half its standard deviation (TextTiling's), at least MIN_DEPTH,
so cutting at a deep valley pays and anywhere else costs; a passage under MIN_WORDS words costs SHORT_PENALTY, and one over
`max_words` is allowed only as a single sentence (sentences are already cut to at most that many
words). So a remark on another topic set among unrelated text becomes its own passage, and an
answer that stays on one topic is cut only where it is too long, at its deepest valleys.
Pure numpy; the vectors come from the caller's encoder (L2-normalised rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BLOCK = 2  # sentences on each side of a gap whose mean vectors are compared
MIN_WORDS = 12  # a passage shorter than this costs SHORT_PENALTY
SHORT_PENALTY = 1.0
MIN_DEPTH = 0.1  # a valley shallower than this is never worth a cut of its own


def gap_similarity(vectors: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Cosine between the mean of the `block` rows before each gap and the `block` after (n - 1 gaps)."""
    v = np.asarray(vectors, dtype=np.float64)
    n = len(v)
    if n < 2:
        return np.zeros(0)
    out = np.empty(n - 1)
    for g in range(1, n):
        left = v[max(0, g - block) : g].mean(axis=0)
        right = v[g : g + block].mean(axis=0)
        denom = float(np.linalg.norm(left) * np.linalg.norm(right))
        out[g - 1] = float(left @ right) / denom if denom > 1e-12 else 0.0
    return out


def depth(sims: np.ndarray) -> np.ndarray:
    """TextTiling's depth score of each gap that is a valley (lower than the gaps on both sides): the
    rise to the nearest peak on its left plus on its right; 0 at every other gap."""
    sims = np.asarray(sims, dtype=np.float64)
    n = len(sims)
    out = np.zeros(n)
    for g in range(1, n - 1):
        if not (sims[g] < sims[g - 1] and sims[g] < sims[g + 1]):
            continue
        left = right = g
        while left > 0 and sims[left - 1] >= sims[left]:
            left -= 1
        while right < n - 1 and sims[right + 1] >= sims[right]:
            right += 1
        out[g] = (sims[left] - sims[g]) + (sims[right] - sims[g])
    return out


def cuts(sizes: Sequence[int], sims: np.ndarray, max_words: int, min_words: int = MIN_WORDS) -> list[int]:
    """Start index of each passage (the first is 0) over sentences of `sizes` words, the cut before
    sentence i scored by the depth of `sims[i - 1]` (module docstring)."""
    n = len(sizes)
    if n == 0:
        return []
    if len(sims) != n - 1:
        raise ValueError(f"{n} sentences need {n - 1} gap similarities, got {len(sims)}")
    deep = depth(sims)
    valleys = deep[deep > 0]
    threshold = max(MIN_DEPTH, float(valleys.mean() - valleys.std() / 2) if len(valleys) else 0.0)
    ends = np.concatenate([[0], np.cumsum(sizes)])
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    back = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            size = int(ends[j] - ends[i])
            if size > max_words and j - i > 1:
                break
            cost = best[i] + (threshold - float(deep[i - 1]) - 1e-9 if i > 0 else 0.0)
            cost += SHORT_PENALTY if size < min_words else 0.0
            if cost < best[j]:
                best[j], back[j] = cost, i
    starts, j = [], n
    while j > 0:
        j = int(back[j])
        starts.append(j)
    return starts[::-1]


def topic_windows(pieces: Sequence[str], vectors: np.ndarray, max_words: int) -> list[str]:
    """`pieces` (sentences, in order) joined into passages cut by `cuts`; no word lost or repeated."""
    if len(pieces) != len(vectors):
        raise ValueError(f"{len(pieces)} sentences but {len(vectors)} vectors")
    if not pieces:
        return []
    sizes = [len(p.split()) for p in pieces]
    starts = cuts(sizes, gap_similarity(vectors), max_words)
    bounds = [*starts, len(pieces)]
    return [" ".join(pieces[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
