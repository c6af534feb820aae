"""The CPU floor of ingest: what each turn costs the host's cores whatever the orchestration.

Every turn an ingest stores must be parsed and validated, scanned for injected instructions, counted
in the generator's tokens (the unit of every budget) and tokenised for the embedding model. None of
it runs on the GPU. This bench times those four steps alone, on LoCoMo turns, in one process with one
thread (CPU microseconds per turn), then runs the three per-text steps together on 1..N spawned
processes (one thread each, as the flow's pool runs them), and the two tokenisers alone the same
way, and reports the turns/s they reach. The
turns/s at all cores is a ceiling for the whole flow on this host: Prefect, Ray, DuckDB, the index
builds and the model's own host work all come on top.

    python bench/ingest_cpu_floor.py --data ../shared/data/locomo/locomo-dev.json --turns 55200 \
        [--procs 1 2 4 8 16] [--out bench/results/ingest_cpu_floor_<machine>.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("MEMSTAGE_SCAN_WORKERS", "1")  # parse in this process: its own cost, not the pool's
# (after the thread limits: it imports numpy)
from encoder_gpu_probe import texts_of  # noqa: E402 - n distinct LoCoMo turn texts, as the probe makes them

_state: dict = {}


def _setup(models_root: str) -> None:
    from memstage.gpu.encoder import Encoder
    from memstage.gpu.tokenizer import TokenCounter

    enc = Encoder(device="cpu", light=True)
    enc._tokenizer()
    _state.update(counter=TokenCounter(Path(models_root)), encoder=enc)


STEPS = ("injection_scan", "token_count", "embedding_tokenise")


def _steps(texts: list[str], steps: tuple[str, ...] = STEPS) -> dict[str, float]:
    """CPU seconds of each per-text step over `texts` (this process, one thread)."""
    from memstage.tasks.injection import flag_text

    enc, counter = _state["encoder"], _state["counter"]
    out = {}
    if "injection_scan" in steps:
        start = time.process_time()
        for t in texts:
            flag_text(t)
        out["injection_scan"] = time.process_time() - start
    if "token_count" in steps:
        start = time.process_time()
        for i in range(0, len(texts), 512):
            counter.count_many(texts[i : i + 512])
        out["token_count"] = time.process_time() - start
    if "embedding_tokenise" in steps:
        start = time.process_time()
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for i in range(0, len(order), 1024):
            enc._id_matrix([texts[k] for k in order[i : i + 1024]])
        out["embedding_tokenise"] = time.process_time() - start
    return out


def _work(job: tuple[list[str], tuple[str, ...]]) -> int:
    _steps(*job)
    return len(job[0])


def parse_cost(data: Path, replicate: int) -> float:
    """CPU us per turn of parsing and validating a LoCoMo file (`parse_file`, one process)."""
    from memstage.tasks.ingest import parse_file

    samples = json.loads(data.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "x.json"
        copies = []
        for r in range(replicate):
            for s in samples:
                copies.append({**s, "sample_id": f"{s['sample_id']}-r{r}"})
        big.write_text(json.dumps(copies))
        start = time.process_time()
        events, _ = parse_file(big, "locomo", None)
        return (time.process_time() - start) / events.num_rows * 1e6


def pool_rate(texts: list[str], procs: int, models_root: str, steps: tuple[str, ...]) -> float:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(procs, initializer=_setup, initargs=(models_root,)) as pool:
        pool.map(_work, [(texts[:64], steps)] * procs)  # warm every process
        share = -(-len(texts) // (procs * 4))
        start = time.perf_counter()
        done = sum(pool.map(_work, [(texts[i : i + share], steps) for i in range(0, len(texts), share)]))
        rate = done / (time.perf_counter() - start)
        pool.close()
        pool.join()
        return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/locomo/locomo-dev.json")
    ap.add_argument("--turns", type=int, default=55_200)
    ap.add_argument("--procs", type=int, nargs="+", default=None)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from memstage.gpu.tokenizer import ensure_converted
    from memstage.settings import get_settings
    from memstage.stores.store import models_dir

    models_root = str(models_dir(get_settings().home))
    ensure_converted(Path(models_root))
    texts = texts_of(args.data, args.turns)
    _setup(models_root)
    _steps(texts[:256])  # warm-up: the scan's tables, the tokenizers' caches
    per_turn = {k: v / len(texts) * 1e6 for k, v in _steps(texts).items()}
    per_turn["parse"] = parse_cost(args.data, max(1, args.turns // 2760))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    procs = args.procs or sorted({1, 2, max(1, cpus // 2), cpus})
    rates = {str(p): round(pool_rate(texts, p, models_root, STEPS), 1) for p in procs}
    # the two tokenisers alone (HuggingFace tokenizers, Rust): what no Python-side work can cut
    tokenisers = ("token_count", "embedding_tokenise")
    rates_tok = {str(p): round(pool_rate(texts, p, models_root, tokenisers), 1) for p in procs}
    total = sum(per_turn.values())
    result = {
        "turns": len(texts),
        "cpus": cpus,
        "cpu_us_per_turn": {k: round(v, 1) for k, v in per_turn.items()},
        "cpu_us_per_turn_total": round(total, 1),
        "ceiling_turns_per_s_if_linear": round(cpus / total * 1e6, 1),
        "per_text_steps_turns_per_s_by_procs": rates,
        "tokenisers_only_turns_per_s_by_procs": rates_tok,
        "load_average": list(os.getloadavg()),
        "command": "python " + " ".join(sys.argv),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print(f"\n{'step':28s} CPU us/turn")
    for k, v in per_turn.items():
        print(f"{k:28s} {v:9.1f}")
    print(f"{'total':28s} {total:9.1f}   -> at most {cpus / total * 1e6:,.0f} turns/s on {cpus} CPUs")
    for p, r in rates.items():
        print(
            f"on {p:>2s} processes: per-text steps {r:,.0f} turns/s; the tokenisers alone {rates_tok[p]:,.0f}"
        )


if __name__ == "__main__":
    main()
