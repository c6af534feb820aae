"""Retrieval at scale: namespaces of 10k..1M memories, built, consolidated, loaded and queried.

    python bench/scale.py --sizes 10000 100000 1000000 --json

Per size, a fresh data directory holds one namespace: a LoCoMo dev conversation planted among
synthetic conversations (how they are made, and the bench shortcuts taken: bench/scale_data.py).
The planted turns become level-0 memories (the index stage's first steps), then the real
consolidate stage builds the hierarchy (clustering included) and the real index stage builds the
indexes, in `memstage maintain`'s order; each phase's seconds and peak RSS (`<phase>_s`,
`<phase>_peak_mb`) are reported. Then a new process (so its RSS is the query side's alone) loads the namespace and asks the planted
conversation's questions (categories 1-4 with evidence) at a 1000-token budget, warm, the
question's encoding included, one thread (torch and FAISS); wall time (p50_ms/p95_ms) and the
process's CPU time per question (cpu_p50_ms/cpu_p95_ms, which a busy shared machine inflates far
less), with the load average, and the same without the question's encoding (`*_no_encoding`: each
embedding made beforehand, as serve's batches do; the H200 goal's figure). Reported per size: build and consolidate times, load time, RSS,
retrieval p50/p95, and recall@1000 of the planted conversation next to the same conversation alone
in its own namespace (same pipeline), without the hierarchy as a candidate source too, and (up to
--exhaustive-max memories) with an exhaustive scan of the same scoring. `backend` names the dense
search backend (FAISS CPU/GPU or torch), so the same command measures a CUDA host. There level 0 is
scored on the card (`scoring`: device; MEMSTAGE_DEVICE_SCORING), and the host's candidate path on
the same namespace is measured beside it (`host_*`). `--replicate F` also queries each size's
namespace with its synthetic part copied F times (bench/scale_replicate.py: 10M memories in
minutes, not the hours the stages take). `--whole-packing` also queries each size, before the
figures above, with MEMSTAGE_DROP_REPEATS=0 (`whole_packing`: the packing of before tasks/repeats.py,
the same-run baseline for what leaving out repeated sentences costs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from memstage.settings import get_settings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from process_figures import PeakRss, card_mb, rss_mb, timed  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "locomo" / "locomo-dev.json"
NS = "scale"


def models():
    from memstage.gpu.encoder import Encoder
    from memstage.gpu.tokenizer import TokenCounter

    root = get_settings().models or Path.home() / ".cache" / "memstage-models"
    return Encoder(), TokenCounter(root)


def planted_events(path: Path, conv: str, namespace: str):
    import pyarrow as pa
    import pyarrow.compute as pc

    from memstage.tasks.ingest import parse_file

    events, _ = parse_file(path, "locomo")
    events = events.filter(pc.equal(events.column("namespace"), conv))
    return events.set_column(
        events.schema.get_field_index("namespace"), "namespace", pa.array([namespace] * events.num_rows)
    )


def build(home: Path, args, size: int | None, encoder, counter, turns, emb) -> dict[str, float]:
    """Write the namespace (synthetic part straight into the tables, planted part as events), make
    the planted level-0 memories, then run the consolidate stage and the index stage, in the order
    `memstage maintain` runs them (each phase's seconds and peak RSS in the figures)."""
    from scale_data import node_embedder, synthetic_tables

    from memstage.stores.store import MemoryStore
    from memstage.tasks.consolidate import run_consolidate
    from memstage.tasks.index import run_index

    shutil.rmtree(home, ignore_errors=True)
    store = MemoryStore(home)
    figures: dict[str, float] = {}
    peak = PeakRss()
    planted = planted_events(args.data, args.planted, NS)
    if size:
        n_syn = max(0, size - planted.num_rows)
        events, memories, means = peak.phase(
            figures,
            "generate",
            synthetic_tables,
            turns,
            emb,
            planted=args.planted,
            namespace=NS,
            n=n_syn,
            counter=counter,
            noise=args.noise,
            seed=args.seed,
        )
        peak.phase(figures, "write", write_tables, store, events, memories)
        del events, memories
    else:
        means = {}
    with store.writer() as w:
        w.insert("events", planted)
    embed = node_embedder(encoder, means)
    kw = {"embed": embed, "count_tokens": counter.count_many}
    peak.phase(figures, "level0", level0_stage, store, kw)
    result = peak.phase(figures, "consolidate", run_consolidate, store, NS, **kw)
    figures["texts_encoded"], figures["node_texts_by_turn_mean"] = embed.real, embed.proxy
    figures["level1_nodes"] = result.figures["level1_nodes"]
    figures["level2_nodes"] = result.figures["level2_nodes"]
    peak.phase(figures, "index", run_index, store, NS, **kw)
    return figures


def level0_stage(store, kw) -> None:
    """The index stage's first two steps (level-0 memories of the planted events, their embeddings):
    what ingest leaves before maintenance runs consolidate and then the index stage."""
    from memstage.tasks.index import embed_missing, materialise_level0

    materialise_level0(store, NS, count_tokens=kw["count_tokens"])
    embed_missing(store, NS, kw["embed"])


def write_tables(store, events, memories, chunk: int = 100_000) -> None:
    for lo in range(0, events.num_rows, chunk):
        with store.writer() as w:
            w.insert("events", events.slice(lo, chunk))
            w.insert("memories", memories.slice(lo, chunk))


def query_side(home: Path, args, env: dict[str, str] | None = None) -> dict[str, Any]:
    """In a new process (with `env` added to its environment): load the namespace, ask the planted
    questions (warm), report figures."""
    cmd = [
        sys.executable,
        __file__,
        "--_query",
        str(home),
        "--data",
        str(args.data),
        "--planted",
        args.planted,
        "--exhaustive-max",
        str(args.exhaustive_max),
        "--questions",
        str(args.questions),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"query process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _query_main(home: Path, args) -> dict[str, Any]:
    import torch

    from memstage.stores.store import MemoryStore
    from memstage.tasks.evaluate import load_questions, own_memories, run_questions
    from memstage.tasks.retrieve import Retriever

    torch.set_num_threads(1)  # one question at a time: extra intra-op threads only add contention
    # sampled, not ru_maxrss: a child started by the build process inherits its parent's maximum
    peak = PeakRss()
    encoder, counter = models()
    store = MemoryStore(home)
    ns = store.namespaces()[0]
    questions = [q for q in load_questions(args.data).items if q.namespace == args.planted]
    questions = questions[: args.questions] if args.questions else questions
    for q in questions:
        q.namespace = ns
    owns = own_memories(store, ns)
    base_rss = rss_mb()
    retriever = Retriever(store, encoder, counter)
    loaded, load_s = timed(retriever.load, ns)
    out: dict[str, Any] = {"load_s": load_s, "rss_before_load_mb": round(base_rss), "memories": loaded.n}
    out["dense_kind"] = loaded.levels[0].dense.kind
    out["backend"] = loaded.levels[0].dense.backend
    out["card_mb"] = card_mb()
    for q in questions[:5]:
        retriever.retrieve(ns, q.question, 1000)  # warm
    cpu: list[float] = []

    def timed_retrieve(namespace: str, question: str, budget: int) -> dict[str, Any]:
        start = time.process_time()  # this process's CPU time: what the busy machine does not inflate
        result = retriever.retrieve(namespace, question, budget)
        cpu.append((time.process_time() - start) * 1000)
        return result

    records = run_questions(timed_retrieve, questions, {ns: owns}, (1000,))
    lat = [r["latency_ms"] for r in records]
    out.update(
        p50_ms=round(float(np.percentile(lat, 50)), 2),
        p95_ms=round(float(np.percentile(lat, 95)), 2),
        cpu_p50_ms=round(float(np.percentile(cpu, 50)), 2),
        cpu_p95_ms=round(float(np.percentile(cpu, 95)), 2),
        load_average=[round(x, 1) for x in os.getloadavg()],
        recall=round(float(np.mean([r["recall"] for r in records])), 4),
        questions=len(records),
    )
    out.update(without_encoding(retriever, ns, questions))
    out["scoring"] = "device" if loaded.device is not None else "host"
    on_host = {ns: dataclasses.replace(loaded, device=None)}  # the candidate path, scored on the host
    if loaded.device is not None:  # ... on the same namespace in the same run: the baseline
        host = Retriever(store, encoder, counter)
        host._loaded = on_host
        records = run_questions(host.retrieve, questions, {ns: owns}, (1000,))
        out["host_recall"] = round(float(np.mean([r["recall"] for r in records])), 4)
        out.update({f"host_{k}": v for k, v in without_encoding(host, ns, questions).items()})
    scored = []
    for q in questions[:20]:
        retriever.retrieve(ns, q.question, 1000)
        scored.append(retriever.last_figures.get("scored", 0))
    out["scored_rows_mean"] = round(float(np.mean(scored)), 1)
    flat = Retriever(store, encoder, counter, hierarchy=False)
    flat._loaded = retriever._loaded
    records = run_questions(flat.retrieve, questions, {ns: owns}, (1000,))
    out["recall_no_hierarchy"] = round(float(np.mean([r["recall"] for r in records])), 4)
    out["p95_ms_no_hierarchy"] = round(float(np.percentile([r["latency_ms"] for r in records], 95)), 2)
    if loaded.n <= args.exhaustive_max:
        scan = Retriever(store, encoder, counter, exhaustive=True)
        scan._loaded = on_host
        records = run_questions(scan.retrieve, questions, {ns: owns}, (1000,))
        out["recall_exhaustive"] = round(float(np.mean([r["recall"] for r in records])), 4)
        out["p95_ms_exhaustive"] = round(float(np.percentile([r["latency_ms"] for r in records], 95)), 2)
    out["rss_mb"] = round(rss_mb())
    out["peak_rss_mb"] = round(max(peak.peak, rss_mb()))
    return out


def without_encoding(retriever, ns: str, questions) -> dict[str, float]:
    """Warm retrieval with each question's embedding made beforehand (`retrieve(qvec=)`, as serve's
    batches do): the search, scoring and packing alone, the figure the H200 goal is set on."""
    qvecs = retriever.encoder.encode([retriever.searched(ns, q.question) for q in questions])
    wall, cpu = [], []
    for q, v in zip(questions, qvecs, strict=True):
        start, start_cpu = time.perf_counter(), time.process_time()
        retriever.retrieve(ns, q.question, 1000, qvec=v)
        wall.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
    return {
        "p50_ms_no_encoding": round(float(np.percentile(wall, 50)), 2),
        "p95_ms_no_encoding": round(float(np.percentile(wall, 95)), 2),
        "cpu_p95_ms_no_encoding": round(float(np.percentile(cpu, 95)), 2),
    }


WHOLE_KEYS = (
    "p50_ms",
    "p95_ms",
    "p50_ms_no_encoding",
    "p95_ms_no_encoding",
    "cpu_p95_ms",
    "recall",
    "load_average",
)


def record(report: dict, key: str, q: dict, alone: dict, figures: dict, start: float) -> None:
    """One size's line of the report: the query side's figures beside the build's."""
    report["backend"] = q["backend"]
    report["sizes"][key] = {
        "p50_ms": q["p50_ms"],
        "p95_ms": q["p95_ms"],
        "load_s": q["load_s"],
        "rss_mb": q["rss_mb"],
        "recall_planted": q["recall"],
        "recall_alone": alone["recall"],
        **{
            k: v
            for k, v in q.items()
            if k not in ("p50_ms", "p95_ms", "load_s", "rss_mb", "recall", "backend")
        },
        **figures,
        "total_s": round(time.perf_counter() - start, 1),
    }
    print(f"size {key}: {json.dumps(report['sizes'][key])}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--planted", default="conv-26")
    ap.add_argument("--noise", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--questions", type=int, default=0, help="ask only the first N planted questions (0: all)"
    )
    ap.add_argument("--exhaustive-max", type=int, default=100_000)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "memstage-scale")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "memstage-bench")
    ap.add_argument("--keep", action="store_true", help="keep the data directories")
    ap.add_argument(
        "--whole-packing",
        action="store_true",
        help="also query each size with MEMSTAGE_DROP_REPEATS=0 (packing before tasks/repeats.py)",
    )
    ap.add_argument(
        "--replicate",
        type=int,
        nargs="*",
        default=[],
        help="also query each size's namespace with its synthetic part copied F times (bench/scale_replicate.py)",
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--_query", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # DuckDB's buffers bounded (its default is 80% of RAM): the 1M build shares a 24 GB machine
    os.environ.setdefault("MEMSTAGE_DUCKDB_MEMORY", "2GB")
    if args._query is not None:
        print(json.dumps(_query_main(args._query, args)))
        return 0
    if not args.data.exists():
        print(f"LoCoMo dev data not found at {args.data}", file=sys.stderr)
        return 2
    from scale_data import cached_embeddings, dev_turns

    encoder, counter = models()
    turns = dev_turns(args.data)
    emb = cached_embeddings(turns, args.cache, encoder, counter)
    report: dict[str, Any] = {
        "sizes": {},
        "command": " ".join(sys.argv),
        "machine": f"{platform.node()}, {os.cpu_count()} cores",
    }
    alone_home = args.work / "alone"
    alone_build = build(alone_home, args, None, encoder, counter, turns, emb)
    alone = query_side(alone_home, args)
    report["alone"] = {**alone_build, **alone}
    for size in args.sizes:
        home = args.work / f"n{size}"
        start = time.perf_counter()
        figures = build(home, args, size, encoder, counter, turns, emb)
        if args.whole_packing:  # the same namespace, packed with exact copies skipped only
            whole = query_side(home, args, {"MEMSTAGE_DROP_REPEATS": "0"})
            figures["whole_packing"] = {k: whole[k] for k in WHOLE_KEYS if k in whole}
        record(report, str(size), query_side(home, args), alone, figures, start)
        for factor in args.replicate:  # the bench shortcut past what the stages build in minutes
            from scale_replicate import replicate

            start = time.perf_counter()
            copy_home = args.work / f"n{size}x{factor}"
            made = replicate(home, copy_home, factor)
            made["replicate_s"] = round(time.perf_counter() - start, 1)
            q = query_side(copy_home, args)
            record(report, str(made["memories"]), q, alone, {"replicated_from": size, **made}, start)
            if not args.keep:
                shutil.rmtree(copy_home, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    sizes = report["sizes"]
    if len(sizes) >= 2:
        lo, hi = sizes[min(sizes, key=int)], sizes[max(sizes, key=int)]
        report["p95_growth"] = round(hi["p95_ms"] / lo["p95_ms"], 2)
    if not args.keep:
        shutil.rmtree(alone_home, ignore_errors=True)
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{'size':>9} {'p50 ms':>8} {'p95 ms':>8} {'load s':>7} {'RSS MB':>7} {'recall':>7} {'alone':>7}"
        )
        for size, r in sizes.items():
            print(
                f"{size:>9} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['load_s']:7.2f} {r['rss_mb']:7.0f} "
                f"{r['recall_planted']:7.3f} {r['recall_alone']:7.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
