"""Which dense-scan kernel and which session top-3 form are fastest on a card (issue 16): the probe
`gpu/triton_scoring.py`'s choices come from.

    python bench/device_kernels.py --rows 10000000 --out device_kernels.json     # needs CUDA

On random int8 codes with a per-row scale and a unit query, one query, timed by CUDA events (median
of 30): a cuBLAS fp16 matvec over the dequantised vectors (the baseline: what device scoring ran
before), `torch._int_mm` with the query quantised (two layouts), and `gpu.triton_scoring`'s scan
kernel at several block shapes, alone and inside a CUDA graph, with its largest error against
float32; then a session's best three of a [rows/21 x 43] grid by `torch.topk`, by three max passes
and by a sort. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA card here: nothing to measure", file=sys.stderr)
        return 2
    report = {
        "rows": args.rows,
        "machine": f"{torch.cuda.get_device_name()}, torch {torch.__version__}",
        **scans(args.rows),
        **session_top3(args.rows),
    }
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
