"""Dense search parameters measured on real embeddings: where flat search stops being fast, and IVF's nprobe.

Vectors: the LoCoMo dev turns' real embeddings (cached by bench/scale.py) plus noise as in
bench/scale_data.py (sigma 0.02 per dimension), so they keep the structure of real ones. Queries:
real embeddings of the dev questions. Per size: flat search ms per query (p50/p95, one query at a
time, as the retriever asks), and for IVF (8-bit codes, nlist = 2 sqrt(n)) per nprobe: ms and the
share of flat's top-200 it returns.

    python bench/ann_params.py --sizes 50000 100000 200000 400000 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def pct(ms: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p95": round(float(np.percentile(ms, 95)), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000, 200_000, 400_000])
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 24, 32, 48])
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/locomo/locomo-dev.json")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "memstage-bench")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import faiss
    from scale_data import cached_embeddings, dev_turns

    from memstage.gpu.encoder import Encoder
    from memstage.gpu.vector_index import build_cpu_index
    from memstage.tasks.evaluate import load_questions

    encoder = Encoder(device="cpu")
    build_threads = faiss.omp_get_max_threads()
    emb = cached_embeddings(dev_turns(args.data), args.cache, encoder, None)
    questions = [q.question for q in load_questions(args.data).items][: args.queries]
    queries = np.asarray(encoder.encode(questions), np.float32)
    rng = np.random.default_rng(0)
    report = {"sizes": {}, "k": args.k, "search_threads": 1}
    for n in args.sizes:
        x = emb[rng.integers(0, len(emb), n)] + rng.normal(0, 0.02, size=(n, emb.shape[1])).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        flat = build_cpu_index(x, flat_max=n)
        ms, truth = [], []
        faiss.omp_set_num_threads(1)  # one query at a time, as the retriever searches (gpu/vector_index.py)
        for q in queries:
            t = time.perf_counter()
            _, rows = flat.search(q[None], args.k)
            ms.append((time.perf_counter() - t) * 1000)
            truth.append(set(rows[0].tolist()))
        faiss.omp_set_num_threads(build_threads)
        t = time.perf_counter()
        ivf = build_cpu_index(x, flat_max=0)
        faiss.omp_set_num_threads(1)
        entry = {"flat_ms": pct(ms), "ivf_build_s": round(time.perf_counter() - t, 1), "ivf": {}}
        for nprobe in args.nprobe:
            ivf.nprobe = nprobe
            ms, rec = [], []
            for q, want in zip(queries, truth, strict=True):
                t = time.perf_counter()
                _, rows = ivf.search(q[None], args.k)
                ms.append((time.perf_counter() - t) * 1000)
                rec.append(len(want & set(rows[0].tolist())) / len(want))
            entry["ivf"][str(nprobe)] = {**pct(ms), "recall_of_flat": round(float(np.mean(rec)), 4)}
        report["sizes"][str(n)] = entry
        print(f"{n}: {json.dumps(entry)}", file=sys.stderr, flush=True)
    print(json.dumps(report) if args.json else json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
