"""Building blocks of the consolidate stage over L2-normalised embedding matrices, deterministic:
near-duplicates, episodes, extractive summaries, topics. Sized for a namespace of 1M memories:
duplicates are compared within a speaker in row blocks (memory bounded by the block), and topics
are clustered exactly (average linkage) up to TOPIC_EXACT_MAX nodes, above that within k-means
partitions of about TOPIC_EXACT_MAX / 2 nodes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

MAX_EPISODE = 40  # turns; longer sessions are split at their weakest topic boundary
MIN_EPISODE = 8
SHIFT_THRESHOLD = 0.2  # window cosine below this is a topic shift
WINDOW = 4
_WORDS = re.compile(r"[a-z0-9]{4,}")
DUP_BLOCK = 4096
TOPIC_EXACT_MAX = 2000


def _norm(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-9)


def find_duplicates(
    mem: list[dict[str, Any]], emb: np.ndarray, threshold: float
) -> dict[str, tuple[str, float]]:
    """{duplicate id: (survivor id, cosine)}: connected components of the pairs above threshold, per
    speaker (scipy's csgraph); the earliest memory of each component survives."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    best = np.zeros(len(mem))
    rows: list[int] = []
    cols: list[int] = []
    by_speaker: dict[str, list[int]] = {}
    for i, m in enumerate(mem):
        by_speaker.setdefault(m["speaker"] or "", []).append(i)
    for idx in (np.asarray(v) for v in by_speaker.values() if len(v) > 1):
        x = emb[idx]
        for lo in range(0, len(idx), DUP_BLOCK):  # row blocks: memory O(block x group), not O(group^2)
            sims = x[lo : lo + DUP_BLOCK] @ x.T
            a, b = np.nonzero(sims > threshold)
            keep = lo + a < b
            a, b, cos = lo + a[keep], b[keep], sims[a[keep], b[keep]]
            rows += idx[a].tolist()
            cols += idx[b].tolist()
            np.maximum.at(best, idx[a], cos)
            np.maximum.at(best, idx[b], cos)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(mem), len(mem)))
    _, labels = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(i)
    out = {}
    key = lambda i: (mem[i]["event_time"] or datetime.min.replace(tzinfo=UTC), mem[i]["id"])  # noqa: E731
    for members in groups.values():
        if len(members) < 2:
            continue
        survivor = min(members, key=key)
        for i in members:
            if i != survivor:
                out[mem[i]["id"]] = (mem[survivor]["id"], round(float(best[i]), 4))
    return out


def split_episodes(emb: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) spans of one session's turns: cut at topic shifts, and anything over MAX_EPISODE at its weakest point."""
    n = len(emb)

    def shift_scores(lo: int, hi: int) -> dict[int, float]:
        out = {}
        for i in range(lo + MIN_EPISODE, hi - MIN_EPISODE + 1):
            a = emb[max(lo, i - WINDOW) : i].mean(0)
            b = emb[i : min(hi, i + WINDOW)].mean(0)
            out[i] = float(_norm(a) @ _norm(b))
        return out

    def split(lo: int, hi: int) -> list[tuple[int, int]]:
        scores = shift_scores(lo, hi)
        if not scores:
            return [(lo, hi)]
        cut = min(scores, key=lambda i: (scores[i], i))
        if scores[cut] < SHIFT_THRESHOLD or hi - lo > MAX_EPISODE:
            return split(lo, cut) + split(cut, hi)
        return [(lo, hi)]

    return split(0, n) if n else []


def extractive_summary(texts: Sequence[str], emb: np.ndarray, k: int) -> list[int]:
    """Positions of the k best texts, in their original order: centrality (cosine to the centroid)
    weighted by how many distinct words a text has, since the most central turns of a chat are
    otherwise its pleasantries."""
    centrality = emb @ _norm(emb.mean(0))
    score = [
        float(centrality[i]) * math.log1p(len(set(_WORDS.findall(t.lower())))) for i, t in enumerate(texts)
    ]
    top = sorted(range(len(texts)), key=lambda i: (-score[i], i))[:k]
    return sorted(top)


def cluster_topics(emb: np.ndarray, distance: float, _depth: int = 0) -> list[list[int]]:
    """Average-linkage agglomerative clusters (cosine distance), deterministic; singletons included.
    Above TOPIC_EXACT_MAX rows (the exact form holds n^2/2 distances: 6 GB at 40k session nodes), within
    spherical k-means partitions of about TOPIC_EXACT_MAX/2 rows; a topic never spans two partitions."""
    if len(emb) < 2:
        return [[i] for i in range(len(emb))]
    if len(emb) > TOPIC_EXACT_MAX:
        return _partitioned_topics(emb, distance, _depth)
    from scipy.cluster.hierarchy import fcluster, linkage

    # scipy's average linkage on cosine distances, cut where a merge would pass `distance`
    labels = fcluster(linkage(emb, method="average", metric="cosine"), t=distance, criterion="distance")
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(int(lab), []).append(i)
    return sorted(groups.values())


def _partitioned_topics(emb: np.ndarray, distance: float, depth: int) -> list[list[int]]:
    import faiss

    x = np.ascontiguousarray(emb, dtype=np.float32)
    if depth >= 3:  # k-means does not split it (near-identical vectors): fixed-size chunks
        parts = [np.arange(lo, min(lo + TOPIC_EXACT_MAX, len(x))) for lo in range(0, len(x), TOPIC_EXACT_MAX)]
    else:
        k = math.ceil(2 * len(x) / TOPIC_EXACT_MAX)
        km = faiss.Kmeans(x.shape[1], k, niter=10, seed=1, spherical=True, max_points_per_centroid=256)
        km.train(x)
        label = km.index.search(x, 1)[1][:, 0]
        parts = [np.flatnonzero(label == p) for p in range(k)]
    out = []
    for rows in (p for p in parts if len(p)):
        out += [sorted(int(rows[i]) for i in g) for g in cluster_topics(x[rows], distance, depth + 1)]
    return sorted(out)
