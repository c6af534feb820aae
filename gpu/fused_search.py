"""Exact inner-product top-k on CUDA in one pass over the vectors: scores and per-block top-k fused.

`torch.topk(Q @ X.T)` writes the whole [queries x rows] score matrix and reads it back for the top-k;
at 1M rows and 32 queries that is 64 MB written and re-read besides the 768 MB of vectors. Here a
Triton kernel reads each block of rows once, scores it against every query (tensor cores), keeps
the block's k best per query in registers and writes only those candidates (a few hundred KB); a
small `torch.topk` over the candidates finishes. Search is memory-bound, so the goal is to read the
vectors once at close to the card's bandwidth. `topk_ip` uses it where it measured faster and
plain `topk(Q @ X.T)` elsewhere (and where Triton is missing).
"""

from __future__ import annotations

import torch

MAX_FUSED_K = 32  # the in-register selection costs k passes over a block; past this torch is faster

try:  # Triton ships with CUDA builds of torch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only hosts
    triton = None


if triton is not None:

    @triton.jit
    def _block_topk_kernel(
        X,
        Q,
        OUT_V,
        OUT_I,
        N,
        NQ,
        NBLOCKS,
        stride_x,
        stride_q,
        D: tl.constexpr,
        K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_q = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        row_ok = rows < N
        q_ok = qs < NQ
        acc = tl.zeros((BLOCK_N, BLOCK_Q), dtype=tl.float32)
        for d0 in tl.static_range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            x = tl.load(
                X + rows[:, None] * stride_x + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
            )
            q = tl.load(
                Q + qs[None, :] * stride_q + dd[:, None], mask=q_ok[None, :] & d_ok[:, None], other=0.0
            )
            acc += tl.dot(x, q)
        acc = tl.where(row_ok[:, None], acc, float("-inf"))
        local = tl.arange(0, BLOCK_N)
        out = (qs * NBLOCKS + pid_n) * K
        for j in tl.static_range(K):
            best = tl.max(acc, axis=0)
            arg = tl.argmax(acc, axis=0)
            tl.store(OUT_V + out + j, best, mask=q_ok)
            tl.store(OUT_I + out + j, pid_n * BLOCK_N + arg, mask=q_ok)
            acc = tl.where(local[:, None] == arg[None, :], float("-inf"), acc)

    @triton.jit
    def _group_max_kernel(
        X,
        Q,
        OUT,
        N,
        NQ,
        NGROUPS,
        stride_x,
        stride_q,
        D: tl.constexpr,
        G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One pass over a block of rows: scores against every query, then the max of each group of G
        # consecutive rows. No selection loop; the exact top-k is recovered by rescoring top groups.
        pid_n = tl.program_id(0)
        pid_q = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        row_ok = rows < N
        q_ok = qs < NQ
        acc = tl.zeros((BLOCK_N, BLOCK_Q), dtype=tl.float32)
        for d0 in tl.static_range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            x = tl.load(
                X + rows[:, None] * stride_x + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
            )
            q = tl.load(
                Q + qs[None, :] * stride_q + dd[:, None], mask=q_ok[None, :] & d_ok[:, None], other=0.0
            )
            acc += tl.dot(x, q)
        acc = tl.where(row_ok[:, None], acc, float("-inf"))
        gmax = tl.max(tl.reshape(acc, (BLOCK_N // G, G, BLOCK_Q)), axis=1)
        groups = pid_n * (BLOCK_N // G) + tl.arange(0, BLOCK_N // G)
        tl.store(
            OUT + qs[None, :] * NGROUPS + groups[:, None],
            gmax,
            mask=q_ok[None, :] & (groups[:, None] < NGROUPS),
        )


def fused_available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def topk_ip_fused(
    x: torch.Tensor,
    q: torch.Tensor,
    k: int,
    *,
    block_n: int = 128,
    block_q: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of q @ x.T with the fused kernel: (scores float32 [nq, k], rows int64 [nq, k])."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    n, d = x.shape
    nq = q.shape[0]
    q = q.to(x.dtype).contiguous()
    block_q = block_q or max(16, min(64, triton.next_power_of_2(nq)))  # tl.dot needs >= 16
    nblocks = triton.cdiv(n, block_n)
    k_block = min(k, block_n)
    vals = torch.empty((nq, nblocks * k_block), device=x.device, dtype=torch.float32)
    idx = torch.empty((nq, nblocks * k_block), device=x.device, dtype=torch.int32)
    grid = (nblocks, triton.cdiv(nq, block_q))
    _block_topk_kernel[grid](
        x, q, vals, idx, n, nq, nblocks, x.stride(0), q.stride(0),
        D=d, K=k_block, BLOCK_N=block_n, BLOCK_Q=block_q, BLOCK_D=min(128, triton.next_power_of_2(d)),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    k = min(k, vals.shape[1])
    best, pos = torch.topk(vals, k, dim=1)
    return best, torch.gather(idx, 1, pos).long()


def topk_ip_grouped(
    x: torch.Tensor,
    q: torch.Tensor,
    k: int,
    *,
    group: int = 16,
    block_n: int = 256,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k via group maxima: one fused scan writes the max of every `group` rows per query;
    the k best groups must hold the k best rows (each of those rows lifts its group's max above the
    k-th best score, and at most k groups can do so), so rescoring their k x group rows is exact."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    n, d = x.shape
    nq = q.shape[0]
    q = q.to(x.dtype).contiguous()
    block_q = max(16, min(64, triton.next_power_of_2(nq)))
    ngroups = triton.cdiv(n, group)
    gmax = torch.empty((nq, ngroups), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, block_n), triton.cdiv(nq, block_q))
    _group_max_kernel[grid](
        x, q, gmax, n, nq, ngroups, x.stride(0), q.stride(0),
        D=d, G=group, BLOCK_N=block_n, BLOCK_Q=block_q, BLOCK_D=min(128, triton.next_power_of_2(d)),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    kg = min(k, ngroups)
    _, top_groups = torch.topk(gmax, kg, dim=1)
    rows = (top_groups[:, :, None] * group + torch.arange(group, device=x.device)).reshape(nq, -1)
    past_end = rows >= n  # the last group may be short
    rows = rows.clamp_(max=n - 1)
    cand = torch.einsum("qd,qrd->qr", q.float(), x[rows].float()).masked_fill_(past_end, float("-inf"))
    best, pos = torch.topk(cand, min(k, n), dim=1)
    return best, torch.gather(rows, 1, pos)


def _chunk_for(n: int, target: int = 4096) -> int | None:
    """The largest divisor of n in [target/8, target], so rows split into equal chunks with no copy."""
    for c in range(min(target, n), max(target // 8, 1) - 1, -1):
        if n % c == 0:
            return c
    return None


def topk_ip_two_stage(x: torch.Tensor, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of q @ x.T in torch: one matmul, top-k per chunk of rows, then over the candidates.

    Many small sorts run faster than one sort over a million-wide row.
    """
    n = x.shape[0]
    scores = q.to(x.dtype) @ x.T
    chunk = _chunk_for(n)
    if chunk is None or k > chunk or n <= chunk:
        best, rows = torch.topk(scores, min(k, n), dim=1)
        return best.float(), rows
    nq = scores.shape[0]
    cv, ci = torch.topk(scores.view(nq, n // chunk, chunk), k, dim=2)
    ci = ci + torch.arange(0, n, chunk, device=x.device).view(1, -1, 1)
    best, pos = torch.topk(cv.reshape(nq, -1), k, dim=1)
    return best.float(), torch.gather(ci.reshape(nq, -1), 1, pos)


def topk_ip(x: torch.Tensor, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products of queries `q` [nq, d] against rows of `x` [n, d] on x's device.

    Dispatch by measurement (H100, 1M x 384 fp16, k=10; bench/results/gpu_engines_h100_run2.json):
    from 16 queries up the group-max kernel wins (32 queries: 0.488 ms against 0.640 for
    topk(q @ x.T); 128 queries: 0.914 against 1.418); below that cuBLAS's GEMV plus topk is as fast
    as any kernel of ours (one query: 0.440 ms, 1.75 TB/s scanned, 59% of the measured copy rate).
    """
    k = min(k, x.shape[0])
    if fused_available(x) and k <= MAX_FUSED_K and x.shape[0] >= 4096 and q.shape[0] >= 16:
        group = 32 if q.shape[0] <= 64 else 16
        return topk_ip_grouped(x, q, k, group=group, block_n=128, num_warps=4)
    scores, rows = torch.topk(q.to(x.dtype) @ x.T, k, dim=1)
    return scores.float(), rows
