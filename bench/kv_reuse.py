"""KV reuse: time to first token with the prefix cache against without, over a LoCoMo question stream.

--engine transformers (default, CPU): the transformers engine with memstage's own prefix cache, below.
--engine vllm (CUDA): vLLM's automatic prefix caching on two streams, LoCoMo and a multi-turn chat,
with SmolLM2 or an 8B shape with dummy weights (bench/kv_reuse_vllm.py says how it measures):
    python bench/kv_reuse.py --engine vllm --model llama8b --out bench/results/kv_reuse_vllm_h200.json

One conversation becomes one namespace (ingest, index and consolidate stages, called as plain
functions); 50 of its questions are retrieved with `tasks.retrieve` at a 1,000-token budget and
answered by the transformers engine twice each in the same run: cold (cache bypassed) and with reuse.
Prints one JSON object (`ttft_ms_cold_p50`, `ttft_ms_reuse_p50`, `ttft_ratio`, `cached_token_share`,
...) on stdout with --json, and a short table on stderr. Skips cleanly when the data file is absent.

    python bench/kv_reuse.py --data ../shared/data/locomo/locomo-dev.json --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_namespace(data: Path, conversation: str, home: Path, models: Path, device: str = "cpu"):
    """A store with one LoCoMo conversation ingested, indexed and consolidated; its retriever."""
    from memstage.gpu.encoder import Encoder
    from memstage.gpu.tokenizer import TokenCounter
    from memstage.stores.store import MemoryStore
    from memstage.tasks.consolidate import run_consolidate
    from memstage.tasks.index import run_index
    from memstage.tasks.ingest import commit_events, parse_file
    from memstage.tasks.retrieve import Retriever

    sample = next(s for s in json.loads(data.read_text()) if s["sample_id"] == conversation)
    home.mkdir(parents=True, exist_ok=True)
    conv = home / "conv.json"
    conv.write_text(json.dumps([sample]))
    store = MemoryStore(home)
    events, quarantine = parse_file(conv, "locomo")
    commit_events(store, events, quarantine)
    encoder = Encoder(device)
    counter = TokenCounter(models)
    run_index(store, conversation, embed=encoder.encode, count_tokens=counter.count_many)
    run_consolidate(store, conversation, embed=encoder.encode, count_tokens=counter.count_many)
    run_index(store, conversation, embed=encoder.encode, count_tokens=counter.count_many)
    return store, Retriever(store, encoder, counter), counter, sample


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def flops_per_token(model_dir: Path) -> tuple[float, float]:
    """(weight FLOPs per prompt token, attention FLOPs per token per earlier position) of a Llama-type
    model, from its config: what prefill costs at best, whatever the kernels."""
    c = json.loads((model_dir / "config.json").read_text())
    h, layers, inter = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    heads = c["num_attention_heads"]
    hd = c.get("head_dim") or h // heads
    kv = c.get("num_key_value_heads") or heads
    weights = layers * (h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter)
    return 2.0 * weights, 4.0 * layers * heads * hd


def ttft_bound(rows: list[dict], per_token: float, per_position: float) -> float:
    """The best cold/reuse ratio of median prefill cost any engine can reach on these prompts: cold
    computes every token, reuse only those after the cached prefix, each attending to all before it."""

    def cost(start: int, end: int) -> float:  # tokens start..end-1, token p attends to p+1 positions
        return (end - start) * per_token + per_position * ((end * (end + 1) - start * (start + 1)) / 2)

    cold = [cost(0, r["prompt_tokens"]) for r in rows]
    reuse = [cost(min(r["shared_prefix"], r["prompt_tokens"] - 1), r["prompt_tokens"]) for r in rows]
    return statistics.median(cold) / statistics.median(reuse)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/locomo/locomo-dev.json")
    ap.add_argument("--conversation", default="conv-26")
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--standing-budget", type=int, default=1500)
    ap.add_argument("--layout", choices=("stable", "window"), default="window")
    ap.add_argument("--window-tokens", type=int, default=4000)
    ap.add_argument("--cold-every", type=int, default=5, help="time the cold path on every n-th question")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--models", type=Path, default=None, help="models folder (default: the store's)")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default); 1 is steadier on a shared CPU",
    )
    ap.add_argument("--dry", action="store_true", help="prompt token shares only, no generation")
    ap.add_argument("--engine", choices=("transformers", "vllm"), default="transformers")
    ap.add_argument("--model", choices=("smollm2", "llama8b"), default="smollm2", help="vllm: which model")
    ap.add_argument("--eager", action="store_true", help="vllm: enforce_eager (no CUDA graphs, no compile)")
    ap.add_argument("--gpu-memory", type=float, default=0.2, help="vllm: gpu_memory_utilization")
    ap.add_argument("--streams", default="multi_turn,locomo", help="vllm: which streams, comma-separated")
    ap.add_argument("--turns", type=int, default=12, help="vllm multi_turn: turns in the chat")
    ap.add_argument("--context-tokens", type=int, default=4000, help="vllm multi_turn: memory context size")
    ap.add_argument("--answer-tokens", type=int, default=32, help="vllm: answer length (decode rate)")
    ap.add_argument("--identity", type=int, default=5, help="vllm: prompts per stream checked for identity")
    ap.add_argument("--identity-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None, help="vllm: also write the JSON here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not args.data.exists():
        print(json.dumps({"skipped": f"no data at {args.data}"}))
        return 0

    if args.engine == "vllm":
        return main_vllm(args)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from memstage.gpu.generator import TransformersGenerator
    from memstage.gpu.tokenizer import ensure_converted
    from memstage.tasks.generate import EvidenceWindow, build_messages, standing_block

    t_setup = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        models = args.models or home / "models"
        model_dir = ensure_converted(models)
        flops = flops_per_token(model_dir)
        store, retriever, counter, sample = build_namespace(args.data, args.conversation, home, models)
        ns = args.conversation
        standing = standing_block(store.memories(ns), args.standing_budget, counter.count)
        qs = [q["question"] for q in sample["qa"] if q.get("category") in (1, 2, 3, 4)][: args.questions]
        gen = TransformersGenerator.load(model_dir, "cpu")
        window = EvidenceWindow(args.window_tokens) if args.layout == "window" else None
        setup_s = time.perf_counter() - t_setup

        rows, seen = [], []
        for i, q in enumerate(qs):
            retrieval = retriever.retrieve(ns, q, args.budget)
            messages = build_messages(retrieval, standing=standing, window=window)
            ids = gen.prompt_ids(messages)
            row = {
                "prompt_tokens": len(ids),
                "shared_prefix": max((common_prefix(ids, s) for s in seen), default=0),
            }
            seen.append(ids)
            if not args.dry:
                if i % args.cold_every == 0:
                    cold = gen.generate(messages, max_tokens=args.max_tokens, use_cache=False)
                    row["ttft_ms_cold"] = cold.ttft_s * 1e3
                    row["cold_text"] = cold.text
                reuse = gen.generate(messages, max_tokens=args.max_tokens, use_cache=True)
                row.update(
                    ttft_ms_reuse=reuse.ttft_s * 1e3, cached_tokens=reuse.cached_tokens, text=reuse.text
                )
                print(
                    f"q{i:02d} prompt {len(ids):5d} cached {reuse.cached_tokens:5d} "
                    f"cold {row.get('ttft_ms_cold', float('nan')):8.1f} ms reuse {row['ttft_ms_reuse']:7.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
            rows.append(row)

    prompt_total = sum(r["prompt_tokens"] for r in rows)
    out = {
        "conversation": ns,
        "questions": len(rows),
        "budget": args.budget,
        "layout": args.layout,
        "standing_tokens": counter.count(standing) if standing else 0,
        "prompt_tokens_p50": statistics.median(r["prompt_tokens"] for r in rows),
        "prompt_tokens_max": max(r["prompt_tokens"] for r in rows),  # must fit the model's context
        # Without generation: the share of prompt tokens that begin like an earlier prompt (the bound).
        "shared_prefix_share": round(sum(r["shared_prefix"] for r in rows) / prompt_total, 4),
        "uncached_tokens_p50": statistics.median(r["prompt_tokens"] - r["shared_prefix"] for r in rows),
        # The FLOP bound of ttft_ratio for this prompt stream: no kernel can beat it.
        "ttft_ratio_flop_bound": round(ttft_bound(rows, *flops), 2),
        "setup_s": round(setup_s, 1),
        "threads": torch.get_num_threads(),
    }
    if window is not None:
        out["window_tokens"], out["window_resets"] = args.window_tokens, window.resets
    if not args.dry:
        cold = [r["ttft_ms_cold"] for r in rows if "ttft_ms_cold" in r]
        reuse = [r["ttft_ms_reuse"] for r in rows]
        out.update(
            ttft_ms_cold_p50=round(statistics.median(cold), 1),
            ttft_ms_reuse_p50=round(statistics.median(reuse), 1),
            ttft_ratio=round(statistics.median(cold) / statistics.median(reuse), 2),
            # Same questions only: the ratio of medians over the questions timed both ways.
            ttft_ratio_paired_p50=round(
                statistics.median(
                    r["ttft_ms_cold"] / r["ttft_ms_reuse"] for r in rows if "ttft_ms_cold" in r
                ),
                2,
            ),
            cached_token_share=round(sum(r["cached_tokens"] for r in rows) / prompt_total, 4),
            cold_timed=len(cold),
            answers_identical=f"{sum(r['text'] == r['cold_text'] for r in rows if 'cold_text' in r)}/{len(cold)}",
            kv_cache=gen.kv_cache.stats.as_dict(),
        )
    print(
        "\n".join(f"{k:24s} {v}" for k, v in out.items() if k not in ("kv_cache",)),
        file=sys.stderr,
    )
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    return 0


def main_vllm(args: argparse.Namespace) -> int:
    """The vLLM half (bench/kv_reuse_vllm.py): namespace built on the GPU encoder, then both streams."""
    import kv_reuse_vllm as kv

    from memstage.tasks.generate import standing_block

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        models = args.models or home / "models"
        t0 = time.perf_counter()
        store, retriever, counter, sample = build_namespace(
            args.data, args.conversation, home, models, "cuda"
        )
        ns = args.conversation
        ctx = {
            "ns": ns,
            "retriever": retriever,
            "counter": counter,
            "standing": standing_block(store.memories(ns), args.standing_budget, counter.count),
            "questions": [q["question"] for q in sample["qa"] if q.get("category") in (1, 2, 3, 4)],
        }
        setup_s = time.perf_counter() - t0
        args.streams = [s.strip() for s in args.streams.split(",")]
        out = kv.run(args, ctx, models, Path(tmp))
    out.update(
        conversation=ns, budget=args.budget, window_tokens=args.window_tokens, setup_s=round(setup_s, 1)
    )
    kv.dump(out, args.out)
    print(kv.table(out), file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
