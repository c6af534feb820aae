"""Retrieval latency: warm-process `Retriever.retrieve` p50/p95 per question over the LoCoMo questions.

Indexes and encoder loaded once (each namespace warmed by one query), then every category 1-4
question is asked once at the budget; the time of each call is split into question encoding (the
sentence encoder's forward pass) and the rest (scoring, packing). The load average is printed too:
on a shared machine, other processes' load shows up in these numbers.

    python bench/retrieval_latency.py --home DIR           # a data dir that already holds the LoCoMo file
    python bench/retrieval_latency.py --data FILE [--json] # ingest + index FILE into a temporary dir first
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class TimedEncoder:
    """Wraps an encoder and keeps the time of its last `encode` call."""

    def __init__(self, encoder: Any) -> None:
        self.encoder, self.last_ms = encoder, 0.0

    def encode(self, texts: Any, **kw: Any) -> np.ndarray:
        start = time.perf_counter()
        out = self.encoder.encode(texts, **kw)
        self.last_ms = (time.perf_counter() - start) * 1000
        return out


def percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p95": round(float(np.percentile(ms, 95)), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/locomo/locomo-dev.json")
    ap.add_argument(
        "--home", type=Path, default=None, help="a data dir with the file already ingested and indexed"
    )
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: best for one short query)"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not args.data.exists():
        print(f"no LoCoMo file at {args.data}; skipping", file=sys.stderr)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from memstage.gpu.encoder import Encoder
    from memstage.gpu.tokenizer import TokenCounter
    from memstage.stores.store import MemoryStore
    from memstage.tasks.evaluate import load_questions
    from memstage.tasks.retrieve import Retriever

    tmp = None
    if args.home is None:
        from memstage.cli.eval_commands import prepare_store

        tmp = tempfile.TemporaryDirectory(prefix="memstage-latency-")
        args.home = Path(tmp.name)
        prepare_store(args.data, args.home, maintain=False)
    store = MemoryStore(args.home)
    models = store.models_dir()  # MEMSTAGE_MODELS when set (memstage.settings), else HOME/models
    encoder = TimedEncoder(Encoder(device="cpu"))
    retriever = Retriever(store, encoder, TokenCounter(models))
    questions = load_questions(args.data).items
    for ns in sorted({q.namespace for q in questions}):
        retriever.retrieve(ns, "warm up", 10)
    total, encode = [], []
    for q in questions:
        start = time.perf_counter()
        retriever.retrieve(q.namespace, q.question, args.budget)
        total.append((time.perf_counter() - start) * 1000)
        encode.append(encoder.last_ms)
    rest = [t - e for t, e in zip(total, encode, strict=True)]
    report = {
        "questions": len(questions),
        "budget": args.budget,
        "torch_threads": args.threads,
        "latency_ms": percentiles(total),
        "encode_ms": percentiles(encode),
        "score_and_pack_ms": percentiles(rest),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{report['questions']} questions, budget {args.budget}, torch threads {args.threads}, "
            f"load average {report['load_average']} on {report['cpus']} CPUs"
        )
        for key in ("latency_ms", "encode_ms", "score_and_pack_ms"):
            print(f"  {key:18s} p50 {report[key]['p50']:7.2f}   p95 {report[key]['p95']:7.2f}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
