"""Where a question's time goes when level 0 is scored on a card: each part timed alone.

    python bench/device_parts.py --home DATA_DIR --data locomo-dev.json --out parts.json

Loads the namespace of a data directory bench/scale.py kept, as `memstage` loads it on a CUDA host
(MEMSTAGE_DEVICE_SCORING=auto). For each planted question, with the embedding made beforehand, it
times each part alone, synchronised:
- the dense scan fused with the base score (`_base`: triton's int8 kernel on a card with triton, else
  a matmul over dequantised vectors);
- the question's inputs and BM25 accumulation (`_load`);
- the structure passes run op by op (`_scores`, the scan included);
- top-k over every row, and the neighbour and session passes, each on one question's scores;
- the recorded graph's replay with the copy back (`top`);
- a whole `retrieve` with the host's packing;
- the host's steps of a question, each alone (`host_steps`), and a profile of 150 retrieves with the
  device's top rows cached (`host_profile`: the host's Python alone, by own time).
Median and p95 in ms per part.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def timed(fn, reps: list) -> dict[str, float]:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    out = []
    for args in reps:
        sync()
        start = time.perf_counter()
        fn(*args)
        sync()
        out.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": round(float(np.median(out)), 3), "p95_ms": round(float(np.percentile(out, 95)), 3)}


def host_steps(retriever, ns, name: str, questions: list, qvecs, inputs: list) -> tuple[dict, str]:
    """The host's part of a question, step by step, and a profile of whole retrieves whose device
    top rows are cached (so only the host's Python is in it)."""
    import cProfile
    import io
    import pstats

    from memstage.gpu.lexical_index import analyse
    from memstage.tasks import scoring_device
    from memstage.tasks.retrieve import pack_sizes, search_text
    from memstage.tasks.scoring import scored_words

    w, k, level = scoring_device.weights(), min(scoring_device.rows_for(1000), ns.n), ns.levels[0]
    texts = level.column("text")
    one = [(q,) for q in questions]
    tops = [ns.device.top(i, w, k) for i in inputs]
    chosen = []
    for rows, vals in tops:
        picked, _ = pack_sizes(level.tokens[rows], 1000)
        chosen.append([(0, int(rows[j]), float(vals[j])) for j in picked])
    steps = {
        "search_text": timed(lambda q: search_text(ns, q), one),
        "analyse": timed(lambda q: analyse([q]), one),
        "scored_words": timed(lambda q: scored_words(ns, analyse([q])[0], q), one),
        "question_inputs": timed(
            lambda q, v: scoring_device.question_inputs(ns, v, [], q, None),
            list(zip(questions, qvecs, strict=True)),
        ),
        "device_top": timed(lambda i: ns.device.top(i, w, k), [(i,) for i in inputs]),
        "pack_with_keys": timed(
            lambda rows: pack_sizes(
                level.tokens[rows],
                1000,
                lambda j: " ".join((texts[int(rows[j])].as_py() or "").lower().split()),
            ),
            [(rows,) for rows, _ in tops],
        ),
        "memories": timed(lambda c: retriever._memories(ns, c), [(c,) for c in chosen]),
    }
    cached = dict(zip((i.qvec.tobytes() for i in inputs), tops, strict=True))
    real_top, ns.device.top = ns.device.top, lambda q, w, k: cached[q.qvec.tobytes()]
    prof = cProfile.Profile()
    prof.enable()
    for q, v in zip(questions, qvecs, strict=True):
        retriever.retrieve(name, q, 1000, qvec=v)
    prof.disable()
    ns.device.top = real_top
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    return steps, text.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--planted", default="conv-26")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch
    from scale import models

    from memstage.gpu.lexical_index import analyse
    from memstage.stores.store import MemoryStore
    from memstage.tasks import scoring_device
    from memstage.tasks.evaluate import load_questions
    from memstage.tasks.retrieve import Retriever, search_text
    from memstage.tasks.scoring import scored_words

    torch.set_num_threads(1)
    encoder, counter = models()
    store = MemoryStore(args.home)
    name = store.namespaces()[0]
    retriever = Retriever(store, encoder, counter)
    ns = retriever.load(name)
    if ns.device is None:
        print("level 0 is not on a device here (no CUDA, or MEMSTAGE_DEVICE_SCORING=off)", file=sys.stderr)
        return 2
    dl, w, k = ns.device, scoring_device.weights(), min(scoring_device.rows_for(1000), ns.n)
    questions = [q.question for q in load_questions(args.data).items if q.namespace == args.planted]
    searched = [search_text(ns, q) for q in questions]
    qvecs = encoder.encode(searched)
    inputs = [
        scoring_device.question_inputs(ns, v, scored_words(ns, analyse([s])[0], q), q, None)
        for q, s, v in zip(questions, searched, qvecs, strict=True)
    ]
    for q in inputs[:3]:
        dl.top(q, w, k)  # records the graph
    scores = dl._scores(w)
    parts = {
        "dense_base": timed(lambda: dl._base(), [()] * 50),
        "inputs_and_bm25": timed(lambda q: dl._load(q, w), [(q,) for q in inputs]),
        "scores_op_by_op": timed(lambda q: dl._scores(w), [(q,) for q in inputs]),
        "topk_all_rows": timed(lambda: torch.topk(scores, k), [()] * 50),
        "topk_all_rows_k1024": timed(lambda: torch.topk(scores, min(1024, k)), [()] * 50),
        "neighbour_pass": timed(
            lambda: torch.maximum(
                torch.where(dl.has_prev, scores[dl.prev], w.no_neighbour),
                torch.where(dl.has_next, scores[dl.next], w.no_neighbour),
            ),
            [()] * 50,
        ),
        "session_passes": timed(lambda: dl._session_passes(scores, w.session_top), [()] * 50),
        "graph_top": timed(lambda q: dl.top(q, w, k), [(q,) for q in inputs]),
        "retrieve": timed(
            lambda q, v: retriever.retrieve(name, q, 1000, qvec=v), list(zip(questions, qvecs, strict=True))
        ),
    }
    steps, profile = host_steps(retriever, ns, name, questions, qvecs, inputs)
    report = {
        "memories": ns.n,
        "kernels": bool(dl.kernels),
        "host_steps": steps,
        "host_profile": profile,
        "sessions": dl.n_sessions,
        "padded_sessions": dl.pad is not None and list(dl.pad.shape),
        "parts": parts,
        "command": " ".join(sys.argv),
        "machine": f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    for part, figures in parts.items():
        print(f"{part:>24} p50 {figures['p50_ms']:7.3f} ms  p95 {figures['p95_ms']:7.3f} ms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
