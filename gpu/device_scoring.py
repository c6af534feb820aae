"""Exhaustive scoring of a namespace's level 0 on a torch device: every row scored, per question.

On a CUDA host the level's vectors already sit on the card for the exact dense scan (2 ms for
10M x 384 fp16 on an H200: bench/results/gpu_search_h200.json). Running the rest of
`tasks.scoring.score_rows` there too, over all n rows (BM25 as an `index_add_` of the question
words' posting lists; the neighbour, session, speaker and period passes as elementwise and segment
ops), leaves the host only the packing of the best rows. The candidate set, its session closure
and their numpy passes, most of a question's host time at 1M memories (issue 16), go away, and
the result is the exhaustive scan's. The formulas are `score_rows`' (the reference: a test
compares both on one namespace with CPU tensors). Its weights come in as `Weights`, so this module
imports nothing of the project.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NO_DAY = int(np.iinfo(np.int32).min)  # event day of a memory without an event time (tasks.scoring)
UPLOAD_ROWS = 1 << 20  # rows per host-to-device copy: a 10M-row level never needs a full host copy


@dataclass(frozen=True)
class Weights:
    """`tasks.scoring`'s weights, as one value (read when a question is scored)."""

    w_dense: float
    neighbour: float
    no_neighbour: float
    session: float
    session_top: int
    turn_neighbour: bool
    passage_rest: float
    speaker: float
    speaker_session: float
    period: float


@dataclass(frozen=True)
class Question:
    """One question's inputs, made on the host (`tasks.scoring_device`)."""

    qvec: np.ndarray  # the embedding of the searched text
    dense_mean: float  # cosine mean and sd over the level, from index-time statistics
    dense_sd: float
    columns: tuple[int, ...]  # BM25 vocabulary columns of the scored words
    named: tuple[int, ...]  # speaker codes the question names
    day_ranges: tuple[tuple[int, int], ...]  # inclusive event-day bounds its periods cover


def upload(array: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host array (memory-mapped, maybe read-only) as a device tensor, copied UPLOAD_ROWS at a time."""
    out = torch.empty(
        array.shape, dtype=dtype or torch.from_numpy(np.asarray(array[:0])).dtype, device=device
    )
    for lo in range(0, len(array), UPLOAD_ROWS):
        out[lo : lo + UPLOAD_ROWS] = torch.from_numpy(np.array(array[lo : lo + UPLOAD_ROWS]))
    return out


def device_vectors(
    codes: np.ndarray, scale: np.ndarray, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """int8 embeddings times their per-row scale, dequantised on the device chunk by chunk (the
    host never holds a float copy: 15 GB for 10M x 384)."""
    out = torch.empty(codes.shape, dtype=dtype, device=device)
    for lo in range(0, len(codes), UPLOAD_ROWS):
        chunk = torch.from_numpy(np.array(codes[lo : lo + UPLOAD_ROWS])).to(device)
        s = torch.from_numpy(np.array(scale[lo : lo + UPLOAD_ROWS], np.float32)).to(device)
        out[lo : lo + UPLOAD_ROWS] = (chunk.float() * s[:, None]).to(dtype)
    return out


class DeviceLevel0:
    """One level 0 on a device: vectors, the BM25 matrix (CSC) and the structure arrays."""

    def __init__(
        self,
        vectors: torch.Tensor,
        lexical: tuple[np.ndarray, np.ndarray, np.ndarray],
        structure: dict[str, np.ndarray],
        dtype: torch.dtype = torch.float32,
    ) -> None:
        dev = vectors.device
        self.device, self.dtype, self.vectors = dev, dtype, vectors
        self.n = int(vectors.shape[0])
        data, indices, indptr = lexical
        self.data = upload(data, dev, torch.float32)
        self.indices = upload(indices, dev, torch.int32)
        self.indptr = np.asarray(indptr, np.int64)  # slice bounds are read on the host
        prev, nxt = (upload(structure[k], dev, torch.int64) for k in ("prev", "next"))
        self.session = upload(structure["session"], dev, torch.int64)
        self.speaker = upload(structure["speaker"], dev, torch.int64)
        self.days = upload(structure["days"], dev, torch.int32)
        self.has_prev, self.has_next = prev >= 0, nxt >= 0
        self.prev, self.next = prev.clamp_min(0), nxt.clamp_min(0)
        same = (prev[1:] == prev[:-1]) & (nxt[1:] == nxt[:-1]) & (self.session[1:] == self.session[:-1])
        first = torch.ones(1, dtype=torch.bool, device=dev)
        self.turn = torch.cumsum(torch.cat([first, ~same]).to(torch.int64), 0) - 1
        self.n_turns = int(self.turn[-1]) + 1 if self.n else 0
        self.n_sessions = int(self.session.max()) + 1 if self.n else 0
        self.session_size = torch.bincount(self.session, minlength=self.n_sessions).to(dtype)

    # ---- segment ops ------------------------------------------------------------------------

    def _segmax(self, groups: torch.Tensor, size: int, values: torch.Tensor) -> torch.Tensor:
        out = torch.full((size,), -torch.inf, dtype=values.dtype, device=self.device)
        return out.scatter_reduce_(0, groups, values, "amax", include_self=True)

    def _turn_max(self, values: torch.Tensor) -> torch.Tensor:
        return self._segmax(self.turn, self.n_turns, values)[self.turn]

    def _session_top_mean(self, scores: torch.Tensor, top: int) -> torch.Tensor:
        """Per row, the mean of its session's `top` best scores (ties counted as numpy's sort does)."""
        total = torch.zeros(self.n_sessions, dtype=scores.dtype, device=self.device)
        left = self.session_size.clamp(max=top)
        count_of = left.clone()
        vals = scores
        for _ in range(top):
            best = self._segmax(self.session, self.n_sessions, vals)
            at_best = (vals == best[self.session]).to(scores.dtype)
            count = torch.zeros_like(total).scatter_add_(0, self.session, at_best)
            take = torch.minimum(count, left)
            total += torch.where(take > 0, take * best, 0.0)
            left -= take
            vals = torch.where(vals < best[self.session], vals, -torch.inf)
        return (total / count_of.clamp_min(1))[self.session]

    # ---- scoring ----------------------------------------------------------------------------

    def _lexical_z(self, columns: tuple[int, ...]) -> torch.Tensor:
        acc = torch.zeros(self.n, dtype=torch.float32, device=self.device)
        for c in columns:  # a column's rows are distinct, so each is added once
            lo, hi = int(self.indptr[c]), int(self.indptr[c + 1])
            acc.index_add_(0, self.indices[lo:hi], self.data[lo:hi])
        lex = acc.to(self.dtype)
        mean = lex.sum(dtype=torch.float64) / self.n
        sd = torch.sqrt(torch.clamp((lex.double() ** 2).sum() / self.n - mean * mean, min=0.0))
        return torch.where(sd > 1e-6, (lex - mean.to(self.dtype)) / sd.clamp_min(1e-6).to(self.dtype), 0.0)

    def _hybrid(self, q: Question, w: Weights) -> torch.Tensor:
        qv = torch.from_numpy(np.asarray(q.qvec, np.float32)).to(self.device, self.vectors.dtype)
        cos = (self.vectors @ qv).to(self.dtype)
        dense = (cos - q.dense_mean) / q.dense_sd if q.dense_sd > 1e-6 else torch.zeros_like(cos)
        if not q.columns:
            return dense
        return w.w_dense * dense + (1 - w.w_dense) * self._lexical_z(q.columns)

    def score(self, q: Question, w: Weights) -> torch.Tensor:
        """Every row's score, as `tasks.scoring.score_rows` gives it over all rows."""
        base = self._hybrid(q, w)
        whole = self._turn_max(base) if w.turn_neighbour else base
        before = torch.where(self.has_prev, whole[self.prev], w.no_neighbour)
        after = torch.where(self.has_next, whole[self.next], w.no_neighbour)
        scores = base + w.neighbour * torch.maximum(before, after)
        scores = scores + w.session * self._session_top_mean(scores, w.session_top)
        if q.named:
            by_named = torch.isin(self.speaker, torch.tensor(q.named, device=self.device))
            took = torch.zeros(self.n_sessions, dtype=self.dtype, device=self.device)
            took.scatter_add_(0, self.session, by_named.to(self.dtype))
            scores = scores + w.speaker_session * (took[self.session] > 0).to(self.dtype)
            if len(q.named) == 1:
                scores = scores + w.speaker * by_named.to(self.dtype)
        if w.passage_rest:
            scores = scores + w.passage_rest * (scores < self._turn_max(scores)).to(self.dtype)
        if q.day_ranges:
            hit = torch.zeros(self.n, dtype=torch.bool, device=self.device)
            for lo, hi in q.day_ranges:
                hit |= (self.days >= lo) & (self.days <= hi)
            scores = scores + w.period * hit.to(self.dtype)
        return scores

    def top(self, q: Question, w: Weights, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best rows and their scores, best first (ties by row, as the host's sort breaks them)."""
        if self.n == 0:
            return np.zeros(0, np.int64), np.zeros(0)
        vals, rows = torch.topk(self.score(q, w), min(k, self.n))
        vals, rows = vals.double().cpu().numpy(), rows.cpu().numpy().astype(np.int64)
        order = np.lexsort((rows, -vals))
        return rows[order], vals[order]
