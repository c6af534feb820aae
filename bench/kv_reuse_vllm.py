"""KV reuse on vLLM (GPU): time to first token cold against prefix-cached, on two prompt streams, one engine.

Run through `python bench/kv_reuse.py --engine vllm ...` (this module holds the vLLM half).
Streams, both laid out by `tasks.generate` (system + standing block, evidence, question):
  * locomo: a conversation's questions, each retrieved at --budget tokens into an evidence window
    (the CPU bench's stream);
  * multi_turn: one user asking follow-ups in one chat. The first prompt carries the memory context
    (standing block + evidence for the first question, about --context-tokens); every next turn
    appends the previous answer and the next question, so the whole earlier prompt repeats.
Per prompt, in the same engine and back to back: with prefix caching (blocks of earlier prompts
only), then cold (`skip_reading_prefix_cache`: the whole prompt computed); time to first token is
the wall time to the first answer token with max_tokens=1; then a greedy answer of --answer-tokens,
whose decode rate is reported and which (multi_turn) joins the chat. Token identity: the first
--identity prompts of each stream answered greedily cold and cached, token ids compared.
Models: the SmolLM2 converted from the GGUF (real answers), or an 8B Llama shape with dummy weights
and SmolLM2's tokenizer (`--model llama8b`: speed only, the answers are noise).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def measure(gen: Any, ids: list[int], answer_tokens: int, dummy: bool) -> dict[str, Any]:
    """Reuse, then cold, time to first token of one prompt; then its answer (decode rate)."""
    _, reuse = gen.generate_ids(ids, max_new_tokens=1)
    _, cold = gen.generate_ids(ids, max_new_tokens=1, skip_prefix_cache=True)
    out, answer = gen.generate_ids(ids, max_new_tokens=answer_tokens, ignore_eos=dummy)
    decode_s = answer.total_s - answer.ttft_s
    return {
        "prompt_tokens": len(ids),
        "cached_tokens": reuse.cached_tokens,
        "cold_cached_tokens": cold.cached_tokens,  # must be 0: the cold path reads no cache
        "ttft_ms_reuse": reuse.ttft_s * 1e3,
        "ttft_ms_cold": cold.ttft_s * 1e3,
        "decode_tokens_per_s": (len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else None,
        "answer": answer.text,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    cold = [r["ttft_ms_cold"] for r in rows]
    reuse = [r["ttft_ms_reuse"] for r in rows]
    decode = [r["decode_tokens_per_s"] for r in rows if r["decode_tokens_per_s"]]
    total = sum(r["prompt_tokens"] for r in rows)
    return {
        "prompts": len(rows),
        "prompt_tokens_p50": statistics.median(r["prompt_tokens"] for r in rows),
        "prompt_tokens_max": max(r["prompt_tokens"] for r in rows),
        "ttft_ms_cold_p50": round(statistics.median(cold), 2),
        "ttft_ms_cold_p95": round(pct(cold, 0.95), 2),
        "ttft_ms_reuse_p50": round(statistics.median(reuse), 2),
        "ttft_ms_reuse_p95": round(pct(reuse, 0.95), 2),
        "ttft_ratio": round(statistics.median(cold) / statistics.median(reuse), 2),
        "ttft_ratio_paired_p50": round(statistics.median(c / r for c, r in zip(cold, reuse, strict=True)), 2),
        "cached_token_share": round(sum(r["cached_tokens"] for r in rows) / total, 4),
        "cold_read_cache_tokens": sum(r["cold_cached_tokens"] for r in rows),
        "decode_tokens_per_s_p50": round(statistics.median(decode), 1) if decode else None,
    }


def identity(gen: Any, prompts: list[list[int]], tokens: int) -> dict[str, Any]:
    """Greedy answers cold and cached, token ids compared (the cached run follows a warm-up run)."""
    same, firsts = 0, []
    for ids in prompts:
        cold, _ = gen.generate_ids(ids, max_new_tokens=tokens, skip_prefix_cache=True)
        gen.generate_ids(ids, max_new_tokens=1)  # its blocks are cached now
        warm, res = gen.generate_ids(ids, max_new_tokens=tokens)
        assert res.cached_tokens > 0, "the cached run read no cache"
        if cold == warm:
            same += 1
        else:
            firsts.append(
                next(i for i, (a, b) in enumerate(zip(cold + [-1], warm + [-2], strict=False)) if a != b)
            )
    return {"identical": f"{same}/{len(prompts)}", "tokens": tokens, "first_divergence_at": firsts}


def locomo_prompts(ctx: dict[str, Any], gen: Any, n: int, budget: int, window_tokens: int) -> list[list[int]]:
    from memstage.tasks.generate import EvidenceWindow, build_messages

    window = EvidenceWindow(window_tokens)
    out = []
    for q in ctx["questions"][:n]:
        retrieval = ctx["retriever"].retrieve(ctx["ns"], q, budget)
        out.append(gen.prompt_ids(build_messages(retrieval, standing=ctx["standing"], window=window)))
    return out


def multi_turn(ctx: dict[str, Any], gen: Any, args: Any, dummy: bool) -> tuple[list[dict], list[list[int]]]:
    """One chat: memory context first, then follow-up questions; each turn's answer joins the chat."""
    from memstage.tasks.generate import build_messages

    standing_tokens = ctx["counter"].count(ctx["standing"]) if ctx["standing"] else 0
    budget = max(200, args.context_tokens - standing_tokens - 150)
    qs = ctx["questions"]
    for _ in range(5):  # the evidence budget that makes the first prompt about --context-tokens long
        retrieval = ctx["retriever"].retrieve(ctx["ns"], qs[0], budget)
        messages = build_messages(retrieval, standing=ctx["standing"])
        over = len(gen.prompt_ids(messages)) - args.context_tokens
        if abs(over) <= 0.03 * args.context_tokens or budget <= 200:
            break
        budget = max(200, budget - over)
    rows, prompts = [], []
    for turn in range(args.turns):
        ids = gen.prompt_ids(messages)
        prompts.append(ids)
        row = measure(gen, ids, args.answer_tokens, dummy)
        rows.append(row)
        messages += [{"role": "assistant", "content": row["answer"]},
                     {"role": "user", "content": f"Question: {qs[(turn + 1) % len(qs)]}\nAnswer:"}]  # fmt: skip
    return rows, prompts


def engine_for(args: Any, models: Path, tmp: Path) -> tuple[Any, str, bool]:
    from memstage.gpu.tokenizer import ensure_converted
    from memstage.gpu.vllm_engine import VLLMGenerator, llama_dummy_folder

    smol = ensure_converted(models)
    opts = {"enforce_eager": args.eager, "gpu_memory_utilization": args.gpu_memory}
    if args.model == "llama8b":
        folder = llama_dummy_folder(tmp / "llama8b-dummy", smol)
        gen = VLLMGenerator(folder, load_format="dummy", max_model_len=16384, **opts)
        return gen, "llama-8b-shape (dummy weights; SmolLM2 tokenizer)", True
    return (
        VLLMGenerator(str(smol), max_model_len=8192, **opts),
        "SmolLM2-135M-Instruct (from the GGUF)",
        False,
    )


def run(args: Any, ctx: dict[str, Any], models: Path, tmp: Path) -> dict[str, Any]:
    import torch
    import vllm

    t0 = time.perf_counter()
    gen, model_name, dummy = engine_for(args, models, tmp)
    engine_s = time.perf_counter() - t0
    gen.generate_ids(list(range(100, 612)), max_new_tokens=4)  # warm-up (kernels, graphs)
    streams: dict[str, Any] = {}
    idents: dict[str, Any] = {}
    if "multi_turn" in args.streams:
        rows, prompts = multi_turn(ctx, gen, args, dummy)
        streams["multi_turn"] = summarize(rows)
        idents["multi_turn"] = identity(gen, prompts[: args.identity], args.identity_tokens)
    if "locomo" in args.streams:
        prompts = locomo_prompts(ctx, gen, args.questions, args.budget, args.window_tokens)
        rows = [measure(gen, ids, args.answer_tokens, dummy) for ids in prompts]
        streams["locomo"] = summarize(rows)
        idents["locomo"] = identity(gen, prompts[: args.identity], args.identity_tokens)
    for name, s in streams.items():
        s["token_identity"] = idents[name]
    out = {
        "streams": streams,
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "model": model_name,
        "device": torch.cuda.get_device_name(0),
        "enforce_eager": args.eager,
        "engine_start_s": round(engine_s, 1),
        "ttft": "wall time in this process from add_request to the first token out of the engine, max_tokens=1",
        "answer_sample": rows[0]["answer"][:200] if not dummy else None,
    }
    gen.close()
    return out


def table(out: dict[str, Any]) -> str:
    lines = [
        f"{'stream':<12}{'cold p50':>10}{'reuse p50':>11}{'ratio':>8}{'cached':>8}{'decode/s':>10}  identity"
    ]
    for name, s in out["streams"].items():
        lines.append(
            f"{name:<12}{s['ttft_ms_cold_p50']:>10.1f}{s['ttft_ms_reuse_p50']:>11.1f}{s['ttft_ratio']:>8.2f}"
            f"{s['cached_token_share']:>8.3f}{s['decode_tokens_per_s_p50'] or 0:>10.1f}  {s['token_identity']['identical']}"
        )
    return "\n".join(lines) + f"\nmodel {out['model']}, vllm {out['vllm']}, eager {out['enforce_eager']}"


def dump(out: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(out, indent=1) + "\n")
