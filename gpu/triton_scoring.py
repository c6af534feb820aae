"""Triton kernels that score level 0 on a card (`gpu.device_scoring`), four a question:
- `dense_base`: the int8 dense scan fused with the hybrid base score (dense z mixed with BM25 z);
- `neighbours`: plus the neighbour term, a neighbour turn counted by its best passage;
- `sessions`: per session, the mean of its best scores and whether a speaker of it is named, read
  straight from the session's run of rows;
- `finish`: the session, named-speaker, passage-rest and period terms, a turn's rows together.
The formulas are `tasks.scoring.score_rows`' (through the torch ops of `gpu.device_scoring`, which
`tests/gpu/test_device_kernels.py` compares them with).

Why kernels (H200, 10M x 384, one query; `bench/device_kernels.py`, bench/results/device_kernels_h200.json):
- the scan reads the stored int8 codes and their per-row scale: 1.09 ms in a CUDA graph, against
  1.77 ms for a cuBLAS fp16 matvec over dequantised vectors (3.8 GB read instead of 7.7 GB, and half
  the card memory); `torch._int_mm` took 2.0 ms and needs the question quantised too;
- a session's best three by max passes, 0.79 ms over a padded grid against 1.61 ms for `torch.topk`
  along rows; the kernel takes them in registers from the rows themselves, with no grid, by max,
  count and mask per pass (0.10 ms at 10M rows; an argmax per pass took 0.17-0.72 ms);
- the torch passes were ~40 launches over every row; the row kernels read each map once.
Together a 10M-memory question went from 10.3 to 5.7 ms p95 (bench/results/scale_h200.json).

Without triton (CPU hosts, CI) `available()` is False and `gpu.device_scoring` runs its torch ops.
Under TRITON_INTERPRET=1 the kernels run on CPU tensors: the test checks them that way here, and on
a card in a lease.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

try:  # an optional dependency: torch's CUDA wheels bring it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BM = 64  # rows per program of the scan: the fastest of 16..256 on the H200 (0.998 ms at 10M)
BK = 128  # embedding dimensions loaded at a time
# sessions per program of the session statistics, on one warp: 0.14 ms of card time at 10M rows
# against 0.65 ms for 32 sessions on four warps taking an argmax per pass (max, count and mask alone:
# 0.10 ms at 16 on one warp, 0.25 ms at 32 on four; bench/results/device_level_h200.json)
BS = 16
BR = 256  # rows per program of the row kernels (neighbours, finish)


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _dense_base(
        codes, scale, q, acc, lex_stats, out, n, D: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr
    ):
        """out[r] = mix * (cos_r - mean) * inv_sd + lex_share * z(acc[r]); cos_r = scale[r] * codes[r].q;
        q holds the question's vector, then mean, inv_sd, mix and lex_share (`device_scoring.SCALARS`)."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        live = rows < n
        dot = tl.zeros((BM,), dtype=tl.float32)
        for k in tl.static_range(0, D, BK):
            cols = k + tl.arange(0, BK)
            inside = cols < D
            c = tl.load(
                codes + rows[:, None].to(tl.int64) * D + cols[None, :],
                mask=live[:, None] & inside[None, :],
                other=0,
            )
            qv = tl.load(q + cols, mask=inside, other=0.0).to(tl.float32)
            dot += tl.sum(c.to(tl.float32) * qv[None, :], axis=1)
        cos = dot * tl.load(scale + rows, mask=live, other=0.0)
        mean = tl.load(q + D).to(tl.float32)
        inv_sd = tl.load(q + D + 1).to(tl.float32)
        mix = tl.load(q + D + 2).to(tl.float32)
        lex_share = tl.load(q + D + 3).to(tl.float32)
        lmean = tl.load(lex_stats)
        lsd = tl.load(lex_stats + 1)
        lex = tl.load(acc + rows, mask=live, other=0.0)
        lex_z = tl.where(lsd > 1e-6, (lex - lmean) / tl.maximum(lsd, 1e-6), 0.0)
        tl.store(out + rows, mix * (cos - mean) * inv_sd + lex_share * lex_z, mask=live)

    @triton.jit
    def _sessions(
        scores,
        start,
        size,
        named,
        speaker_ix,
        top_mean,
        any_named,
        n_sessions,
        TOP: tl.constexpr,
        L: tl.constexpr,
        BS: tl.constexpr,
    ):
        """Per session: the mean of its TOP best scores (of fewer when shorter; equal scores counted
        one by one, as numpy's sort does) and whether any of its rows' speakers is named."""
        s = tl.program_id(0) * BS + tl.arange(0, BS)
        live = s < n_sessions
        first = tl.load(start + s, mask=live, other=0).to(tl.int64)
        count = tl.load(size + s, mask=live, other=0)
        offset = tl.arange(0, L)
        inside = offset[None, :] < count[:, None]
        rows = first[:, None] + offset[None, :]
        v = tl.load(scores + rows, mask=inside, other=-float("inf"))
        total = tl.zeros((BS,), dtype=tl.float32)
        need = tl.zeros((BS,), dtype=tl.float32) + TOP
        for _ in tl.static_range(TOP):  # the best left, as many times as it occurs and is still needed
            best = tl.max(v, axis=1)
            took = tl.minimum(tl.sum((v == best[:, None]).to(tl.float32), axis=1), need)
            total += took * tl.where(best > -float("inf"), best, 0.0)  # a short session's -inf adds 0
            need -= took
            v = tl.where(v == best[:, None], -float("inf"), v)
        kept = tl.maximum(tl.minimum(count, TOP), 1).to(tl.float32)
        tl.store(top_mean + s, total / kept, mask=live)
        who = tl.load(speaker_ix + rows, mask=inside, other=0)
        flag = tl.load(named + who, mask=inside, other=0.0)
        tl.store(any_named + s, tl.max(flag, axis=1), mask=live)

    @triton.jit
    def _turn_best(values, turn_start, turn_len, at, ok, TURNS: tl.constexpr, TL: tl.constexpr):
        """Per row of `at` (where `ok`): the best of `values` over that row's turn (TURNS), or its own."""
        if TURNS:
            first = tl.load(turn_start + at, mask=ok, other=0).to(tl.int64)
            count = tl.load(turn_len + at, mask=ok, other=0)
            offset = tl.arange(0, TL)
            inside = ok[:, None] & (offset[None, :] < count[:, None])
            v = tl.load(values + first[:, None] + offset[None, :], mask=inside, other=-float("inf"))
            return tl.max(v, axis=1)
        else:
            return tl.load(values + at, mask=ok, other=0.0)

    @triton.jit
    def _neighbours(
        base, prev, nxt, turn_start, turn_len, out, n, neighbour, no_neighbour,
        TURNS: tl.constexpr, TL: tl.constexpr, BM: tl.constexpr,
    ):  # fmt: skip
        """out = base + neighbour * max(best of the previous turn, of the next; no_neighbour if none)."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        live = rows < n
        p = tl.load(prev + rows, mask=live, other=-1)
        x = tl.load(nxt + rows, mask=live, other=-1)
        before = tl.where(
            p >= 0, _turn_best(base, turn_start, turn_len, p, live & (p >= 0), TURNS, TL), no_neighbour
        )
        after = tl.where(
            x >= 0, _turn_best(base, turn_start, turn_len, x, live & (x >= 0), TURNS, TL), no_neighbour
        )
        b = tl.load(base + rows, mask=live, other=0.0)
        tl.store(out + rows, b + neighbour * tl.maximum(before, after), mask=live)

    @triton.jit
    def _finish(
        scores, session, top_mean, any_named, speaker, named, turn_start, turn_len, day, in_period, q, out,
        n, w_session, w_speaker_session, w_speaker, w_rest, w_period,
        D: tl.constexpr, REST: tl.constexpr, TL: tl.constexpr, BM: tl.constexpr,
    ):  # fmt: skip
        """The session, named-speaker, passage-rest and period terms, in `score_rows`' order; a turn's
        rows are scored together for the rest (a passage below its turn's best), so a row's own score
        and its turn's best come from the same arithmetic."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        live = rows < n
        sess = tl.load(session + rows, mask=live, other=0)
        mean = tl.load(top_mean + sess, mask=live, other=0.0)
        anyn = tl.load(any_named + sess, mask=live, other=0.0)
        single = tl.load(q + D + 4).to(tl.float32)
        if REST:
            first = tl.load(turn_start + rows, mask=live, other=0).to(tl.int64)
            count = tl.load(turn_len + rows, mask=live, other=0)
            offset = tl.arange(0, TL)
            inside = live[:, None] & (offset[None, :] < count[:, None])
            at = first[:, None] + offset[None, :]
            t = tl.load(scores + at, mask=inside, other=0.0)
            t = t + w_session * mean[:, None]
            t = t + w_speaker_session * anyn[:, None]
            t = t + w_speaker * single * tl.load(
                named + tl.load(speaker + at, mask=inside, other=0), mask=inside, other=0.0
            )
            own = tl.sum(tl.where(at == rows[:, None], t, 0.0), axis=1)
            best = tl.max(tl.where(inside, t, -float("inf")), axis=1)
            s = own + w_rest * (own < best).to(tl.float32)
        else:
            s = tl.load(scores + rows, mask=live, other=0.0)
            s = s + w_session * mean
            s = s + w_speaker_session * anyn
            s = s + w_speaker * single * tl.load(
                named + tl.load(speaker + rows, mask=live, other=0), mask=live, other=0.0
            )
        s = s + w_period * tl.load(in_period + tl.load(day + rows, mask=live, other=0), mask=live, other=0.0)
        tl.store(out + rows, s, mask=live)


class RowMaps(NamedTuple):
    """Level 0's structure as int32 maps for the row kernels (`gpu.device_scoring` makes them)."""

    session: torch.Tensor  # session code of each row
    prev: torch.Tensor  # the previous turn's first row, -1 for none
    next: torch.Tensor
    turn_start: torch.Tensor  # first row of the row's turn (a long turn's passages are adjacent)
    turn_len: torch.Tensor
    speaker: torch.Tensor  # index into the question's named-speaker table (its last entry: none)
    day: torch.Tensor  # index into the question's in-period table (its last entry: no event day)
    turn_width: int  # a power of two at least the longest turn


def dense_base(
    codes: torch.Tensor, scale: torch.Tensor, q: torch.Tensor, acc: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """The hybrid base score of every row into `out` (float32): dense z plus lexical z."""
    n, dims = codes.shape
    lmean = acc.sum() / max(n, 1)
    lsd = torch.sqrt(torch.clamp((acc * acc).sum() / max(n, 1) - lmean * lmean, min=0.0))
    stats = torch.stack([lmean, lsd]).to(torch.float32)
    _dense_base[(triton.cdiv(n, BM),)](codes, scale, q, acc, stats, out, n, D=dims, BM=BM, BK=BK, num_warps=4)
    return out


def sessions(
    scores: torch.Tensor,
    start: torch.Tensor,
    size: torch.Tensor,
    longest: int,
    top: int,
    named: torch.Tensor,
    speaker_ix: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per session (float32): the mean of its `top` best scores, and 1.0 where a row's speaker is
    `named` (a float32 table over speaker codes, the last entry for no speaker)."""
    n_sessions = int(start.shape[0])
    top_mean = torch.empty(n_sessions, dtype=torch.float32, device=scores.device)
    any_named = torch.empty(n_sessions, dtype=torch.float32, device=scores.device)
    width = max(triton.next_power_of_2(max(longest, 1)), 2)
    _sessions[(triton.cdiv(n_sessions, BS),)](
        scores, start, size, named, speaker_ix, top_mean, any_named, n_sessions, TOP=top, L=width, BS=BS,
        num_warps=1,
    )  # fmt: skip
    return top_mean, any_named


def neighbours(
    base: torch.Tensor, maps: RowMaps, neighbour: float, no_neighbour: float, turns: bool, out: torch.Tensor
) -> torch.Tensor:
    """`base` plus the neighbour term (`turns`: a neighbour turn counts by its best passage)."""
    n = int(base.shape[0])
    _neighbours[(triton.cdiv(n, BR),)](
        base, maps.prev, maps.next, maps.turn_start, maps.turn_len, out, n, float(neighbour),
        float(no_neighbour), TURNS=turns, TL=maps.turn_width, BM=BR,
    )  # fmt: skip
    return out


def finish(
    scores: torch.Tensor,
    top_mean: torch.Tensor,
    any_named: torch.Tensor,
    maps: RowMaps,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    terms: tuple[float, float, float, float, float],
    rest: bool,
    out: torch.Tensor,
) -> torch.Tensor:
    """The final scores: `tables` are the question's (named, in_period, q) buffers and `terms` the
    weights (session, speaker_session, speaker, passage_rest, period)."""
    named, in_period, q = tables
    n, dims = int(scores.shape[0]), int(q.shape[0]) - 5
    _finish[(triton.cdiv(n, BR),)](
        scores, maps.session, top_mean, any_named, maps.speaker, named, maps.turn_start, maps.turn_len,
        maps.day, in_period, q, out, n, *(float(t) for t in terms), D=dims, REST=rest,
        TL=maps.turn_width, BM=BR,
    )  # fmt: skip
    return out
