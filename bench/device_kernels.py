"""Which dense-scan kernel and which session top-3 form are fastest on a card (issue 16): the probe
`gpu/triton_scoring.py`'s choices come from.

    python bench/device_kernels.py --rows 10000000 --out device_kernels.json     # needs CUDA

On random int8 codes with a per-row scale and a unit query, one query, timed by CUDA events (median
of 30): a cuBLAS fp16 matvec over the dequantised vectors (the baseline: what device scoring ran
before), `torch._int_mm` with the query quantised (two layouts), and `gpu.triton_scoring`'s scan
kernel at several block shapes, alone and inside a CUDA graph, with its largest error against
float32; then a session's best three of a [rows/21 x 43] grid by `torch.topk`, by three max passes
and by a sort. With --level: a synthetic level 0 of that many rows (shaped like bench/scale.py's 10M
replica) scored whole, each kernel's card time per question (torch.profiler) and a whole question's
time at k = 4096 and 1024. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DIMS = 384


def timed(fn, reps: int = 30) -> dict[str, float]:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {"p50_ms": round(times[len(times) // 2], 3), "min_ms": round(times[0], 3)}


def scans(n: int) -> dict[str, object]:
    """The dense scan's forms over the same codes."""
    from memstage.gpu import triton_scoring as ts

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    codes = torch.randint(-127, 128, (n, DIMS), dtype=torch.int8, device=dev, generator=gen)
    scale = torch.rand(n, device=dev, generator=gen) * 0.01 + 0.001
    q = torch.randn(DIMS, device=dev, generator=gen)
    q /= q.norm()
    out: dict[str, object] = {}
    halves = torch.empty((n, DIMS), dtype=torch.float16, device=dev)
    for lo in range(0, n, 1 << 20):
        halves[lo : lo + (1 << 20)] = (
            codes[lo : lo + (1 << 20)].float() * scale[lo : lo + (1 << 20), None]
        ).half()
    out["fp16_matvec"] = timed(lambda: halves @ q.half())
    halves = None  # 7.7 GB at 10M rows, freed before the next forms
    step = q.abs().max() / 127
    q8 = torch.zeros((DIMS, 8), dtype=torch.int8, device=dev)
    q8[:, 0] = torch.round(q / step).to(torch.int8)
    out["int_mm_rowmajor_q"] = timed(lambda: torch._int_mm(codes, q8))
    out["int_mm_colmajor_q"] = timed(lambda: torch._int_mm(codes, q8.t().contiguous().t()))
    buf = torch.zeros(DIMS + 5, device=dev)
    buf[:DIMS] = q
    buf[DIMS + 1 : DIMS + 3] = 1.0  # inv_sd and the dense share: the base score is the cosine
    acc, res = torch.zeros(n, device=dev), torch.empty(n, device=dev)
    for bm in (16, 32, 64, 128, 256):
        ts.BM = bm
        out[f"triton_bm{bm}"] = timed(lambda: ts.dense_base(codes, scale, buf, acc, res))
    ts.BM = 64
    sub = slice(0, 100_000)
    ts.dense_base(codes, scale, buf, acc, res)
    out["triton_maxerr"] = float((res[sub] - (codes[sub].float() @ q) * scale[sub]).abs().max())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ts.dense_base(codes, scale, buf, acc, res)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ts.dense_base(codes, scale, buf, acc, res)
    out["triton_in_graph"] = timed(graph.replay)
    return out


def session_top3(n: int) -> dict[str, object]:
    grid = torch.randn(n // 21, 43, device="cuda")

    def max_passes() -> torch.Tensor:
        v, total = grid.clone(), torch.zeros(grid.shape[0], device="cuda")
        for _ in range(3):
            best, at = v.max(1)
            total += best
            v.scatter_(1, at[:, None], -torch.inf)
        return total

    return {
        "topk3_rows": timed(lambda: torch.topk(grid, 3, dim=1).values.sum(1)),
        "max3_passes": timed(max_passes),
        "sort_rows": timed(lambda: torch.sort(grid, dim=1, descending=True).values[:, :3].sum(1)),
        "max3_equal_topk": bool(torch.allclose(max_passes(), torch.topk(grid, 3, dim=1).values.sum(1))),
    }


def synthetic_level(n: int, seed: int = 0):
    """A level 0 of n rows shaped like bench/scale.py's 10M replica: sessions of 1..43 one-row turns,
    2,400 speakers, event days over three years, a BM25 matrix of 5,000 words and ~2 words a row."""
    import numpy as np

    from memstage.gpu.device_scoring import DeviceLevel0, Int8Rows

    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 44, n // 20 + 1)
    session = np.repeat(np.arange(len(sizes)), sizes)[:n]
    first = np.r_[True, session[1:] != session[:-1]]
    last = np.r_[session[1:] != session[:-1], True]
    rows = np.arange(n)
    prev, nxt = np.where(first, -1, rows - 1), np.where(last, -1, rows + 1)
    speaker = rng.integers(0, 2400, n)
    days = (19000 + rng.integers(0, 1100, len(sizes)))[session].astype(np.int32)
    cols = np.sort(rng.zipf(1.3, 2 * n) % 5000)
    hits = rng.integers(0, n, 2 * n)
    order = np.lexsort((hits, cols))
    cols, hits = cols[order], hits[order]
    keep = np.r_[True, (cols[1:] != cols[:-1]) | (hits[1:] != hits[:-1])]
    cols, hits = cols[keep], hits[keep]
    indptr = np.r_[0, np.cumsum(np.bincount(cols, minlength=5000))]
    data = rng.random(len(hits)).astype(np.float32) * 3
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: under TRITON_INTERPRET
    codes = torch.randint(-127, 128, (n, DIMS), dtype=torch.int8, device=dev)
    scale = torch.rand(n, device=dev) * 0.01 + 0.001
    structure = {"prev": prev, "next": nxt, "session": session, "speaker": speaker, "days": days}
    return DeviceLevel0(Int8Rows(codes, scale), (data, hits.astype(np.int32), indptr), structure)


def session_forms(level, w) -> dict[str, object]:
    """`gpu.triton_scoring`'s session kernel (max, count and mask per pass, with the named-speaker
    flags) at several block shapes, against the form it replaced: an argmax per pass, one occurrence
    of the best masked at a time (the sum of the best `top` is the same)."""
    import triton
    import triton.language as tl

    from memstage.gpu import triton_scoring as ts

    @triton.jit
    def by_argmax(
        scores, start, size, top_mean, n_sessions, TOP: tl.constexpr, L: tl.constexpr, BS: tl.constexpr
    ):
        s = tl.program_id(0) * BS + tl.arange(0, BS)
        live = s < n_sessions
        first = tl.load(start + s, mask=live, other=0).to(tl.int64)
        count = tl.load(size + s, mask=live, other=0)
        offset = tl.arange(0, L)
        v = tl.load(
            scores + first[:, None] + offset[None, :], mask=offset[None, :] < count[:, None], other=-1e30
        )
        total = tl.zeros((BS,), dtype=tl.float32)
        for _ in tl.static_range(TOP):
            best = tl.max(v, axis=1)
            total += tl.where(best > -1e30, best, 0.0)
            v = tl.where(offset[None, :] == tl.argmax(v, axis=1)[:, None], -1e30, v)
        tl.store(top_mean + s, total / tl.maximum(tl.minimum(count, TOP), 1).to(tl.float32), mask=live)

    start, size, longest = level.runs
    scores = torch.randn(level.n, device=level.device)
    out: dict[str, object] = {}
    for bs in (8, 16, 32, 64):
        for warps in (1, 4):
            mean = torch.empty(level.n_sessions, device=level.device)
            anyn = torch.empty_like(mean)
            grid = (triton.cdiv(level.n_sessions, bs),)

            def counts(bs=bs, warps=warps, grid=grid, mean=mean, anyn=anyn):
                ts._sessions[grid](
                    scores, start, size, level._named, level.maps.speaker, mean, anyn, level.n_sessions,
                    TOP=w.session_top, L=64, BS=bs, num_warps=warps,
                )  # fmt: skip

            def argmax(bs=bs, warps=warps, grid=grid, mean=mean):
                by_argmax[grid](
                    scores, start, size, mean, level.n_sessions, TOP=w.session_top, L=64, BS=bs, num_warps=warps
                )  # fmt: skip

            out[f"counts_bs{bs}_w{warps}"] = timed(counts)
            out[f"argmax_bs{bs}_w{warps}"] = timed(argmax)
    want, _ = ts.sessions(scores, start, size, longest, w.session_top, level._named, level.maps.speaker)
    got = torch.empty_like(want)
    by_argmax[(triton.cdiv(level.n_sessions, 32),)](
        scores, start, size, got, level.n_sessions, TOP=w.session_top, L=64, BS=32
    )
    out["argmax_max_diff"] = float((got - want).abs().max())
    return out


def level_breakdown(n: int) -> dict[str, object]:
    """Each kernel's card time in one question's scoring (torch.profiler over op-by-op calls), and
    a whole question (`top`: inputs in, graph replay, best rows back) at k = 4096 and 1024."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    from memstage.gpu.device_scoring import Question, Weights

    level = synthetic_level(n)
    rng = np.random.default_rng(1)
    w = Weights(0.7, 0.5, -1.0, 0.4, 3, True, -0.2, 0.6, 0.3, 0.8)
    questions = []
    for i in range(40):
        v = rng.normal(size=DIMS)
        words = tuple(int(c) for c in rng.choice(200, 6, replace=False))
        q = Question(v / np.linalg.norm(v), 0.01, 0.05, words, (i % 2400,), ((19100, 19130),))
        questions.append(q)
    out: dict[str, object] = {"rows": n, "sessions": level.n_sessions, "kernels": level.kernels}
    for k in (4096, 2048, 1024, 512):
        for q in questions[:3]:
            level.top(q, w, k)
        torch.cuda.synchronize()
        times = []
        for q in questions:
            start = time.perf_counter()
            level.top(q, w, k)
            times.append((time.perf_counter() - start) * 1000)
        out[f"top_k{k}_ms"] = {
            "p50": round(float(np.median(times)), 3),
            "p95": round(float(np.percentile(times, 95)), 3),
        }
    buf = torch.empty((2, 4096), dtype=torch.float64, device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for q in questions[:20]:
            level._load(q, w)
            level._top(w, 4096, buf)
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.self_device_time_total > 0:
            kernels[e.key[:90]] = round(e.self_device_time_total / 20 / 1000, 4)
    out["card_ms_per_question"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:20])
    out["card_ms_total"] = round(sum(kernels.values()), 3)
    for k in (4096, 1024):  # the graph alone, without the inputs' copy in and the rows' copy back
        graph, _ = level._graphs[(w, k)]
        out[f"graph_replay_k{k}"] = timed(graph.replay)
    out["sessions"] = session_forms(level, w)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--level", action="store_true", help="a synthetic level 0 scored whole: each kernel's card time"
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA card here: nothing to measure", file=sys.stderr)
        return 2
    report = {"rows": args.rows, "machine": f"{torch.cuda.get_device_name()}, torch {torch.__version__}"}
    if args.level:
        report["level"] = level_breakdown(args.rows)
    else:
        report.update(**scans(args.rows), **session_top3(args.rows))
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
