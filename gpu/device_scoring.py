"""Exhaustive scoring of a namespace's level 0 on a torch device: every row scored, per question.

On a CUDA host the level sits on the card and all of `tasks.scoring.score_rows` runs there over
all n rows: BM25 as an `index_add_` of the question words' posting lists, then the dense scan and
the neighbour, session, speaker and period passes, as `gpu.triton_scoring`'s four kernels where
triton is (the int8 codes as stored, int32 maps), else as torch elementwise and segment ops over
dequantised vectors. The host keeps only the packing of the best rows: the candidate set, its
session closure and their numpy passes (most of a question's host time at 1M memories, issue 16) go
away, and the result is the exhaustive scan's. The formulas are `score_rows`' (the reference: a
test compares the torch ops with it on CPU tensors, another the kernels with the torch ops). Its
weights come in as `Weights`, so this module imports nothing of the project but `gpu`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from memstage.gpu import triton_scoring

NO_DAY = int(np.iinfo(np.int32).min)  # event day of a memory without an event time (tasks.scoring)
UPLOAD_ROWS = 1 << 20  # rows per host-to-device copy: a 10M-row level never needs a full host copy
PAD_SESSION = 64  # sessions up to this long are scored in a [sessions x longest] grid, not by scatters
SCALARS = ("dense_mean", "dense_inv_sd", "dense_share", "lex_share", "one_named")  # after the qvec
GRAPHS = True  # record the scoring as a CUDA graph on a card (False: launch op by op)


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


@dataclass(frozen=True)
class Int8Rows:
    """Level 0's embeddings as stored: int8 codes [n x dims] and a float32 scale per row (x ~ codes *
    scale), scanned by `triton_scoring`'s kernel without a float copy."""

    codes: torch.Tensor
    scale: torch.Tensor


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
    """One level 0 on a device: vectors, the BM25 matrix (CSC), structure arrays as gather maps, and
    the per-question inputs in fixed buffers. On a card the scoring is one CUDA graph: a question is
    its inputs copied in and one replay. Launched op by op, its ~60 small torch kernels cost the
    H200 host 4.8 ms a question at any size (bench/results/scale_h200_opbyop.json)."""

    def __init__(
        self,
        vectors: torch.Tensor | Int8Rows,
        lexical: tuple[np.ndarray, np.ndarray, np.ndarray],
        structure: dict[str, np.ndarray],
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """`vectors`: float rows, scanned by a matmul; or `Int8Rows`, scanned by `triton_scoring`'s
        kernel when triton is there (with every pass, when sessions are at most PAD_SESSION rows),
        else chunk by chunk."""
        rows = vectors.codes if isinstance(vectors, Int8Rows) else vectors
        dev = rows.device
        self.device, self.dtype, self.vectors = dev, dtype, vectors
        self.n, self.dims = int(rows.shape[0]), int(rows.shape[1])
        self.kernels = isinstance(vectors, Int8Rows) and triton_scoring.available() and dtype == torch.float32
        data, indices, indptr = lexical
        self.data = upload(data, dev, torch.float32)
        self.indices = upload(indices, dev, torch.int32)
        self.indptr = np.asarray(indptr, np.int64)  # slice bounds are read on the host
        self._structure(structure)
        self._acc = torch.zeros(self.n, dtype=torch.float32, device=dev)
        self._base_out = torch.empty(self.n if self.kernels else 0, dtype=torch.float32, device=dev)
        self._rows_out = torch.empty_like(self._base_out)
        self._inputs(dtype)
        self._graphs: dict[tuple[Weights, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] | None = {}

    def _structure(self, structure: dict[str, np.ndarray]) -> None:
        """Gather maps, made once: neighbour links, turns (a long turn's passages), sessions (padded
        to their longest when that is short), speakers and event days as indexes into small tables."""
        dev, n = self.device, self.n
        prev, nxt = (upload(structure[k], dev, torch.int64) for k in ("prev", "next"))
        self.session = upload(structure["session"], dev, torch.int64)
        self.has_prev, self.has_next = prev >= 0, nxt >= 0
        self.prev, self.next = prev.clamp_min(0), nxt.clamp_min(0)
        same = (prev[1:] == prev[:-1]) & (nxt[1:] == nxt[:-1]) & (self.session[1:] == self.session[:-1])
        first = torch.ones(1, dtype=torch.bool, device=dev)
        self.turn = torch.cumsum(torch.cat([first, ~same]).to(torch.int64), 0) - 1
        self.n_turns = int(self.turn[-1]) + 1 if n else 0
        self.passages = self.n_turns < n  # else every turn is one row: turn maxima are the rows' own
        self.n_sessions = int(self.session.max()) + 1 if n else 0
        size = torch.bincount(self.session, minlength=self.n_sessions)
        self.session_size = size.to(self.dtype)
        longest = int(size.max()) if n else 0
        self.pad = self.runs = None
        start = torch.cumsum(size, 0) - size
        if 0 < longest <= PAD_SESSION and self.kernels:  # the kernel reads each session's run of rows
            self.runs = (start, size.to(torch.int32), longest)
        elif 0 < longest <= PAD_SESSION:  # [sessions x longest] row positions, n where a session is shorter
            offset = torch.arange(longest, device=dev)
            self.pad = torch.where(offset < size[:, None], start[:, None] + offset, n)
        speaker = upload(structure["speaker"], dev, torch.int64)
        self.n_speakers = int(speaker.max()) + 1 if n else 0
        self.speaker_ix = torch.where(speaker >= 0, speaker, self.n_speakers)
        days = np.asarray(structure["days"])
        known = days[days != NO_DAY]
        self.day0 = int(known.min()) if len(known) else 0
        self.n_days = int(known.max()) - self.day0 + 1 if len(known) else 0
        ix = np.where(days != NO_DAY, days.astype(np.int64) - self.day0, self.n_days)
        self.day_ix = upload(ix, dev, torch.int64)
        self.maps = self._row_maps(prev, nxt) if self.runs is not None else None

    def _row_maps(self, prev: torch.Tensor, nxt: torch.Tensor) -> triton_scoring.RowMaps:
        """int32 maps for the row kernels (a turn lies in one session, so it is at most PAD_SESSION
        rows where sessions are)."""
        size = torch.bincount(self.turn, minlength=self.n_turns)
        longest = int(size.max()) if self.n else 0
        start = (torch.cumsum(size, 0) - size)[self.turn]
        i32 = torch.int32
        return triton_scoring.RowMaps(
            *(
                t.to(i32)
                for t in (self.session, prev, nxt, start, size[self.turn], self.speaker_ix, self.day_ix)
            ),
            turn_width=1 << max(longest - 1, 0).bit_length(),
        )

    def _inputs(self, dtype: torch.dtype) -> None:
        """A question's inputs as one buffer on the device, copied from one pinned host buffer in one
        copy (three pageable copies, each synchronous, before): the query vector and SCALARS (`_q`),
        1.0 per speaker code named (`_named`), 1.0 per event day in a period (`_in_period`)."""
        sizes = [self.dims + len(SCALARS), self.n_speakers + 1, self.n_days + 1]
        self._device_inputs = torch.zeros(sum(sizes), dtype=dtype, device=self.device)
        self._q, self._named, self._in_period = torch.split(self._device_inputs, sizes)
        on_card = self.device.type == "cuda"
        self._staging = torch.zeros(sum(sizes), dtype=dtype, pin_memory=on_card)
        self._host = self._staging.numpy()
        self._host_q, self._host_named, self._host_period = np.split(self._host, np.cumsum(sizes)[:-1])
        self._copied = torch.cuda.Event() if on_card else None  # the last copy out of the staging buffer

    # ---- per question -----------------------------------------------------------------------

    def _load(self, q: Question, w: Weights) -> None:
        """The question's inputs into the fixed buffers; its BM25 scores into `_acc`."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous question's copy has read the staging buffer
        self._host[:] = 0.0
        self._host_q[: self.dims] = q.qvec
        words = 1.0 if q.columns else 0.0  # without a known word the score is the dense z alone
        self._host_q[self.dims :] = [
            q.dense_mean,
            1.0 / q.dense_sd if q.dense_sd > 1e-6 else 0.0,
            w.w_dense if words else 1.0,
            (1 - w.w_dense) * words,
            1.0 if len(q.named) == 1 else 0.0,
        ]
        self._host_named[[c for c in q.named if 0 <= c < self.n_speakers]] = 1.0
        for lo, hi in q.day_ranges:
            self._host_period[max(lo - self.day0, 0) : max(min(hi - self.day0 + 1, self.n_days), 0)] = 1.0
        self._device_inputs.copy_(self._staging, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self._acc.zero_()
        for c in q.columns:  # a column's rows are distinct, so each is added once
            lo, hi = int(self.indptr[c]), int(self.indptr[c + 1])
            self._acc.index_add_(0, self.indices[lo:hi], self.data[lo:hi])

    # ---- the computation (fixed buffers in, scores out: what a CUDA graph records) -------------

    def _segmax(self, groups: torch.Tensor, size: int, values: torch.Tensor) -> torch.Tensor:
        out = torch.full((size,), -torch.inf, dtype=values.dtype, device=self.device)
        return out.scatter_reduce_(0, groups, values, "amax", include_self=True)

    def _turn_max(self, values: torch.Tensor) -> torch.Tensor:
        return self._segmax(self.turn, self.n_turns, values)[self.turn] if self.passages else values

    def _session_top_mean(self, scores: torch.Tensor, top: int) -> torch.Tensor:
        """Per row, the mean of its session's `top` best scores (ties counted as numpy's sort does)."""
        count = self.session_size.clamp(max=top).clamp_min(1)
        if self.pad is not None:
            grid = torch.cat([scores, scores.new_full((1,), -torch.inf)])[self.pad]
            best = torch.topk(grid, min(top, grid.shape[1]), dim=1).values
            return (torch.where(best > -torch.inf, best, 0.0).sum(1) / count)[self.session]
        total = torch.zeros(self.n_sessions, dtype=scores.dtype, device=self.device)
        left, vals = self.session_size.clamp(max=top), scores
        for _ in range(top):
            best = self._segmax(self.session, self.n_sessions, vals)
            at_best = (vals == best[self.session]).to(scores.dtype)
            took = torch.minimum(torch.zeros_like(total).scatter_add_(0, self.session, at_best), left)
            total, left = total + torch.where(took > 0, took * best, 0.0), left - took
            vals = torch.where(vals < best[self.session], vals, -torch.inf)
        return (total / count)[self.session]

    def _session_any(self, flags: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            return torch.cat([flags, flags.new_zeros(1)])[self.pad].any(1)[self.session]
        hits = torch.zeros(self.n_sessions, dtype=self.dtype, device=self.device)
        return hits.scatter_add_(0, self.session, flags.to(self.dtype))[self.session] > 0

    def _no_kernels(self, exc: Exception) -> None:
        warnings.warn(f"device scoring runs torch ops: a triton kernel failed ({exc})", stacklevel=3)
        self.kernels = False

    def _cos(self) -> torch.Tensor:
        q = self._q[: self.dims]
        if not isinstance(self.vectors, Int8Rows):
            return (self.vectors @ q.to(self.vectors.dtype)).to(self.dtype)
        codes, scale = self.vectors.codes, self.vectors.scale  # without triton: a chunk at a time
        out = torch.empty(self.n, dtype=self.dtype, device=self.device)
        for lo in range(0, self.n, UPLOAD_ROWS):
            hi = lo + UPLOAD_ROWS
            out[lo:hi] = (codes[lo:hi].to(self.dtype) @ q) * scale[lo:hi]
        return out

    def _base(self) -> torch.Tensor:
        """Every row's hybrid base score: the dense z mixed with the BM25 z."""
        if self.kernels:
            try:
                codes, scale = self.vectors.codes, self.vectors.scale
                return triton_scoring.dense_base(codes, scale, self._q, self._acc, self._base_out)
            except Exception as exc:  # noqa: BLE001 - a triton that cannot compile here: torch ops
                self._no_kernels(exc)
        mean, inv_sd, mix, lex_share = (self._q[self.dims + i] for i in range(4))
        cos = self._cos()
        lex = self._acc.to(self.dtype)
        lmean = lex.sum() / self.n
        lsd = torch.sqrt(torch.clamp((lex * lex).sum() / self.n - lmean * lmean, min=0.0))
        lex_z = torch.where(lsd > 1e-6, (lex - lmean) / lsd.clamp_min(1e-6), 0.0)
        return mix * (cos - mean) * inv_sd + lex_share * lex_z

    def _session_passes(self, scores: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the mean of its session's `top` best scores, and 1.0 where a speaker of its
        session is named by the question (torch ops: `_kernel_scores` has its own kernel)."""
        named = self._session_any(self._named[self.speaker_ix] > 0).to(self.dtype)
        return self._session_top_mean(scores, top), named

    def _kernel_scores(self, w: Weights) -> torch.Tensor:
        """`_scores` as four triton kernels: the scan with the base score, the neighbour term, the
        session statistics, and the remaining terms."""
        codes, scale, maps = self.vectors.codes, self.vectors.scale, self.maps
        base = triton_scoring.dense_base(codes, scale, self._q, self._acc, self._base_out)
        turns = w.turn_neighbour and self.passages
        with_nb = triton_scoring.neighbours(base, maps, w.neighbour, w.no_neighbour, turns, self._rows_out)
        start, size, longest = self.runs
        mean, named = triton_scoring.sessions(
            with_nb, start, size, longest, w.session_top, self._named, maps.speaker
        )
        terms = (w.session, w.speaker_session, w.speaker, w.passage_rest, w.period)
        rest = bool(w.passage_rest) and self.passages
        tables = (self._named, self._in_period, self._q)
        return triton_scoring.finish(with_nb, mean, named, maps, tables, terms, rest, torch.empty_like(base))

    def _scores(self, w: Weights) -> torch.Tensor:
        if self.kernels and self.maps is not None:
            try:
                return self._kernel_scores(w)
            except Exception as exc:  # noqa: BLE001 - a triton that cannot compile here: torch ops
                self._no_kernels(exc)
        single = self._q[self.dims + SCALARS.index("one_named")]
        base = self._base()
        whole = self._turn_max(base) if w.turn_neighbour else base
        before = torch.where(self.has_prev, whole[self.prev], w.no_neighbour)
        after = torch.where(self.has_next, whole[self.next], w.no_neighbour)
        scores = base + w.neighbour * torch.maximum(before, after)
        top_mean, session_named = self._session_passes(scores, w.session_top)
        scores = scores + w.session * top_mean
        scores = scores + w.speaker_session * session_named
        scores = scores + w.speaker * single * self._named[self.speaker_ix]
        if w.passage_rest and self.passages:
            scores = scores + w.passage_rest * (scores < self._turn_max(scores)).to(self.dtype)
        return scores + w.period * self._in_period[self.day_ix]

    def _top(self, w: Weights, k: int, out: torch.Tensor) -> None:
        vals, rows = torch.topk(self._scores(w), k)
        out[0].copy_(vals.to(out.dtype))
        out[1].copy_(rows.to(out.dtype))  # exact in float64 (rows < 2^53): one copy back, not two

    def _graph(self, w: Weights, k: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:  # pragma: no cover
        """The computation recorded once per (weights, k), after a warm-up on a side stream."""
        out = torch.empty((2, k), dtype=torch.float64, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._top(w, k, out)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._top(w, k, out)
        return graph, out

    # ---- entry points -------------------------------------------------------------------------

    def score(self, q: Question, w: Weights) -> torch.Tensor:
        """Every row's score, as `tasks.scoring.score_rows` gives it over all rows."""
        self._load(q, w)
        return self._scores(w)

    def top(self, q: Question, w: Weights, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best rows and their scores, best first (ties by row, as the host's sort breaks them)."""
        k = min(k, self.n)
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0)
        self._load(q, w)
        if self.device.type == "cuda" and GRAPHS and self._graphs is not None:  # pragma: no cover
            if (w, k) not in self._graphs:
                try:
                    self._graphs[(w, k)] = self._graph(w, k)
                except RuntimeError as exc:  # a torch that cannot record these ops: op by op, said once
                    warnings.warn(
                        f"device scoring runs op by op: CUDA graph capture failed ({exc})", stacklevel=2
                    )
                    self._graphs = None
                    return self.top(q, w, k)
            graph, out = self._graphs[(w, k)]
            graph.replay()
        else:
            out = torch.empty((2, k), dtype=torch.float64, device=self.device)
            self._top(w, k, out)
        vals, rows = out.cpu().numpy()
        rows = rows.astype(np.int64)
        if np.all(vals[:-1] > vals[1:]):  # topk's order: sorted, and no tie to break (0.3 ms saved)
            return rows, vals
        order = np.lexsort((rows, -vals))
        return rows[order], vals[order]
