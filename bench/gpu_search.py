"""Exact search on the GPU for one query: FAISS GPU flat fp16 against torch matmul + topk, 1M and 10M x 384.

Both backends search the same unit vectors (fp16 on the card; random Gaussian, normalised: exact
search cost does not depend on the data), in the same run, for one query at a time, k=10. Each
timing is the wall time of one call, synchronised (what a caller waits), over --reps calls with a
fresh query each, after warm-up; p50 and p95. FAISS is timed twice: with a numpy query on the host
(results copied back: how a CPU caller uses it) and with a torch query on the card
(faiss.contrib.torch_utils: no host copies, like the torch path). Recall@k of each against exact
fp32 scores. Needs CUDA; FAISS parts are skipped (with the import error) where faiss-gpu is absent.

    python bench/gpu_search.py --out bench/results/gpu_search_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def timed(fn: Any, queries: Any, reps: int, warm: int = 20) -> dict[str, float]:
    import torch

    for i in range(warm):
        fn(queries[i % len(queries)])
    torch.cuda.synchronize()
    ms = []
    for i in range(reps):
        q = queries[i % len(queries)]
        t = time.perf_counter()
        fn(q)
        torch.cuda.synchronize()
        ms.append((time.perf_counter() - t) * 1e3)
    ms.sort()
    return {"p50_ms": round(ms[len(ms) // 2], 4), "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 4)}


def unit_vectors(n: int, d: int, seed: int) -> Any:
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    out = torch.empty((n, d), dtype=torch.float16, device="cuda")
    for s in range(0, n, 1 << 20):  # in slices: no fp32 copy of the whole matrix
        x = torch.randn(min(1 << 20, n - s), d, device="cuda", generator=g)
        out[s : s + len(x)] = torch.nn.functional.normalize(x, dim=1).half()
    return out


def recall(found: Any, exact: Any) -> float:
    f, e = found.tolist(), exact.tolist()
    return sum(len(set(a) & set(b)) for a, b in zip(f, e, strict=True)) / (len(e) * len(e[0]))


def one_size(n: int, d: int, k: int, reps: int, faiss: Any) -> dict[str, Any]:
    import torch

    x = unit_vectors(n, d, seed=n)
    qs = torch.nn.functional.normalize(x[torch.randint(0, n, (64,), device="cuda")].float()
                                       + 0.05 * torch.randn(64, d, device="cuda"), dim=1)  # fmt: skip
    exact = (
        torch.cat([(x[s : s + (1 << 21)].float() @ qs.T) for s in range(0, n, 1 << 21)])
        .topk(k, dim=0)
        .indices.T
    )
    qh = [q.half().unsqueeze(0) for q in qs]
    res: dict[str, Any] = {"vectors": n, "gpu_bytes_fp16": n * d * 2}
    res["torch_matmul_topk"] = timed(lambda q: torch.topk((x @ q.T).squeeze(1), k), qh, reps)
    res["torch_matmul_topk"]["recall"] = recall(
        torch.stack([torch.topk((x @ q.T).squeeze(1), k).indices for q in qh]), exact
    )
    if faiss is None:
        return res
    import faiss.contrib.torch_utils  # noqa: F401 - lets GPU indexes take torch CUDA tensors

    gres = faiss.StandardGpuResources()
    cfg = faiss.GpuIndexFlatConfig()
    cfg.useFloat16 = True
    index = faiss.GpuIndexFlatIP(gres, d, cfg)
    t = time.perf_counter()
    for s in range(0, n, 1 << 20):
        index.add(x[s : s + (1 << 20)].float())
    res["faiss_add_s"] = round(time.perf_counter() - t, 2)
    qf = [q.float() for q in qh]
    res["faiss_flat_fp16_torch_query"] = timed(lambda q: index.search(q, k), qf, reps)
    res["faiss_flat_fp16_torch_query"]["recall"] = recall(
        torch.cat([index.search(q, k)[1] for q in qf]), exact
    )
    qn = [q.cpu().numpy() for q in qf]
    res["faiss_flat_fp16_numpy_query"] = timed(lambda q: index.search(q, k), qn, reps)
    best = min(("torch_matmul_topk", "faiss_flat_fp16_torch_query"), key=lambda b: res[b]["p95_ms"])
    res["faster_on_device"] = best
    index.reset()  # frees the card for the next size
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--dims", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    try:
        import faiss

        faiss_info: Any = {"version": faiss.__version__, "gpus": faiss.get_num_gpus()}
    except ImportError as exc:
        faiss, faiss_info = None, {"import_error": repr(exc)[:500]}
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "faiss": faiss_info,
        "k": args.k,
        "dims": args.dims,
        "queries_per_call": 1,
        "sizes": {},
    }
    for n in (int(s) for s in args.sizes.split(",")):
        out["sizes"][str(n)] = one_size(n, args.dims, args.k, args.reps, faiss)
        torch.cuda.empty_cache()
    out["command"] = "python " + " ".join(sys.argv)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    print(f"{'vectors':>10} {'backend':<30}{'p50 ms':>9}{'p95 ms':>9}{'recall':>8}", file=sys.stderr)
    for n, r in out["sizes"].items():
        for b in ("torch_matmul_topk", "faiss_flat_fp16_torch_query", "faiss_flat_fp16_numpy_query"):
            if b in r:
                print(
                    f"{n:>10} {b:<30}{r[b]['p50_ms']:>9.3f}{r[b]['p95_ms']:>9.3f}{r[b].get('recall', float('nan')):>8.3f}",
                    file=sys.stderr,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
