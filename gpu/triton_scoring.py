"""Triton kernels for scoring level 0 on a card (`gpu.device_scoring`): the int8 dense scan fused
with the hybrid base score, and each session's statistics read straight from its rows.

Measured on an H200 at 10M x 384 (bench/results/device_kernels_h200.json, `.gpu` probe, one query):
- the dense scan over the stored int8 codes and their per-row scale, 1.0 ms, against 1.77 ms for a
  cuBLAS fp16 matvec over the dequantised vectors (3.8 GB read instead of 7.7 GB, and half the card
  memory); `torch._int_mm` took 2.0 ms and needs the question quantised too;
- a session's best three scores by three max passes over a [sessions x longest] grid, 0.8 ms, against
  1.58 ms for `torch.topk` along rows (the grid itself cost a gather of every row besides).
Here a program takes BS sessions, loads each one's rows (sessions are runs of adjacent rows) and
takes the `top` best by max passes in registers: one read of the scores, no grid in memory.

Without triton (CPU hosts, CI) `available()` is False and `gpu.device_scoring` runs its torch ops.
Under TRITON_INTERPRET=1 the kernels run on CPU tensors: tests check them that way against the
host's scoring, and on a card by `tests/gpu/test_device_kernels.py`.
"""

from __future__ import annotations

import torch

try:  # an optional dependency: torch's CUDA wheels bring it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BM = 64  # rows per program of the scan: the fastest of 16..256 on the H200 (0.998 ms at 10M)
BK = 128  # embedding dimensions loaded at a time
BS = 32  # sessions per program of the session statistics


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
        """Per session: the mean of its TOP best scores (of fewer when shorter; a tie taken once per
        pass, so the sum is numpy's) and whether any of its rows' speakers is named."""
        s = tl.program_id(0) * BS + tl.arange(0, BS)
        live = s < n_sessions
        first = tl.load(start + s, mask=live, other=0).to(tl.int64)
        count = tl.load(size + s, mask=live, other=0)
        offset = tl.arange(0, L)
        inside = offset[None, :] < count[:, None]
        rows = first[:, None] + offset[None, :]
        v = tl.load(scores + rows, mask=inside, other=-float("inf"))
        total = tl.zeros((BS,), dtype=tl.float32)
        for _ in tl.static_range(TOP):
            best = tl.max(v, axis=1)
            total += tl.where(best > -float("inf"), best, 0.0)
            at = tl.argmax(v, axis=1)
            v = tl.where(offset[None, :] == at[:, None], -float("inf"), v)
        kept = tl.maximum(tl.minimum(count, TOP), 1).to(tl.float32)
        tl.store(top_mean + s, total / kept, mask=live)
        who = tl.load(speaker_ix + rows, mask=inside, other=0)
        flag = tl.load(named + who, mask=inside, other=0.0)
        tl.store(any_named + s, tl.max(flag, axis=1), mask=live)


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
        scores, start, size, named, speaker_ix, top_mean, any_named, n_sessions, TOP=top, L=width, BS=BS
    )
    return top_mean, any_named
