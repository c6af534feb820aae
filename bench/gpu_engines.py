"""GPU engine benchmark for one CUDA host: encoder, exact vector search, generation with and without KV reuse.

Runs on a machine that has torch/transformers but maybe not faiss, ray or the offline model
packages, so it imports only what it needs, section by section, and a failing section is reported
without stopping the others. Prints a table on stderr and one JSON object on stdout (or --out).

    python bench/gpu_engines.py --out bench/results/gpu_engines.json [--sections copy,search,encoder,generate]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def cuda_ms(fn, reps: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of `fn()` timed with CUDA events, one event pair per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def section_copy() -> dict:
    """The bandwidth ceiling measured here: device-to-device copy, bytes read + written."""
    n = 1 << 30  # 2 GiB of fp16
    src = torch.randn(n, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src), reps=20)
    gbps = 2 * src.numel() * 2 / (ms / 1e3) / 1e9
    return {"copy_ms_2GiB": round(ms, 3), "copy_GBps_read_plus_write": round(gbps, 1)}


def section_search(copy_gbps: float | None) -> dict:
    from memstage.gpu.fused_search import (
        fused_available,
        topk_ip,
        topk_ip_fused,
        topk_ip_grouped,
        topk_ip_two_stage,
    )

    n, d, k = 1_000_000, 384, 10
    x = torch.nn.functional.normalize(torch.randn(n, d, device="cuda"), dim=1).half().contiguous()
    xbytes = x.numel() * x.element_size()
    out: dict = {"rows": n, "dims": d, "k": k, "bytes_scanned": xbytes, "variants": {}}

    def check(fn, q) -> float:
        """Share of the exact float32 top-k ids that `fn` returns (fresh queries each check)."""
        ref = torch.topk(q.float() @ x.float().T, k, dim=1).indices
        _, got = fn(x, q, k)
        hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ref, got, strict=True))
        return hits / ref.numel()

    variants = {
        "torch_topk_matmul": lambda x, q, k: torch.topk(q @ x.T, k, dim=1),
        "torch_two_stage": topk_ip_two_stage,
    }
    if fused_available(x):
        variants["fused_bn128_w4"] = lambda x, q, k: topk_ip_fused(x, q, k, block_n=128, num_warps=4)
        for g in (8, 16, 32):
            for bn, w in ((128, 4), (256, 4), (256, 8), (512, 8)):
                variants[f"grouped_g{g}_bn{bn}_w{w}"] = lambda x, q, k, g=g, bn=bn, w=w: topk_ip_grouped(
                    x, q, k, group=g, block_n=bn, num_warps=w
                )
        variants["topk_ip_default"] = topk_ip
    for nq in (1, 8, 32, 128):
        qs = [
            torch.nn.functional.normalize(torch.randn(nq, d, device="cuda"), dim=1).half() for _ in range(4)
        ]
        for name, fn in variants.items():
            key = f"{name}/q{nq}"
            try:
                recall = check(
                    fn, torch.nn.functional.normalize(torch.randn(nq, d, device="cuda"), dim=1).half()
                )
                i = [0]

                def call(fn=fn, i=i, qs=qs):
                    i[0] = (i[0] + 1) % len(qs)
                    return fn(x, qs[i[0]], k)

                ms = cuda_ms(call, reps=100, warmup=10)
                gbps = xbytes / (ms / 1e3) / 1e9
                out["variants"][key] = {
                    "ms": round(ms, 4),
                    "GBps_scanned": round(gbps, 1),
                    "share_of_copy_rate": round(gbps / copy_gbps, 3) if copy_gbps else None,
                    "recall_vs_fp32": round(recall, 4),
                    "queries_per_s": round(nq / (ms / 1e3)),
                }
            except Exception as exc:  # a variant that fails to compile must not stop the others
                out["variants"][key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def section_encoder(texts_path: str | None) -> dict:
    from memstage.gpu.encoder import Encoder

    texts = Path(texts_path).read_text().splitlines() if texts_path and Path(texts_path).exists() else []
    if not texts:
        texts = [f"sentence number {i} about a memory of a conversation" for i in range(5000)]
    big = (texts * (50_000 // len(texts) + 1))[:50_000]
    out: dict = {"texts": len(big), "mean_words": round(sum(len(t.split()) for t in big) / len(big), 1)}
    enc = Encoder("cuda")
    for fast in (False, True):
        enc.fast_cuda = fast
        label = "fast" if fast else "sentence_transformers"
        enc.encode(big[:2048])  # warm-up: kernels, allocator
        for bs in (512, 1024, 2048):
            torch.cuda.synchronize()
            t = time.perf_counter()
            enc.encode(big, batch_size=bs)
            out[f"cuda_fp16_{label}_bs{bs}_per_s"] = round(len(big) / (time.perf_counter() - t))
    enc.fast_cuda = False
    a = enc.encode(big[:5000])
    enc.fast_cuda = True
    b = enc.encode(big[:5000])
    out["fast_vs_st_min_cosine"] = float((a * b).sum(1).min())
    t = time.perf_counter()
    enc.model.tokenizer(big, truncation=True, max_length=256, padding=False)
    out["tokenize_only_per_s"] = round(len(big) / (time.perf_counter() - t))
    # The model alone at 32 tokens (tokenization and host copies excluded): the reference figure's setup.
    bert = enc.model[0].auto_model
    for bs in (512, 2048):
        ids = torch.randint(1000, 20000, (bs, 32), device="cuda")
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            ms = cuda_ms(lambda ids=ids, mask=mask: bert(input_ids=ids, attention_mask=mask), reps=30)
        out[f"cuda_fp16_model_only_32tok_bs{bs}_per_s"] = round(bs / (ms / 1e3))
    t = time.perf_counter()
    enc_cpu = Encoder("cpu")
    sample = big[:3000]
    t = time.perf_counter()
    enc_cpu.encode(sample)
    out["cpu_fp32_per_s"] = round(len(sample) / (time.perf_counter() - t))
    out["cpu_threads"] = torch.get_num_threads()
    best = max(v for k, v in out.items() if k.startswith("cuda_fp16_fast"))
    out["speedup_cuda_vs_cpu_end_to_end"] = round(best / out["cpu_fp32_per_s"], 1)
    return out


def _llama8b():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=32768,
        eos_token_id=-1,  # random weights: never stop early, so every run decodes the same count
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def section_generate(quick: bool) -> dict:
    from memstage.gpu.generator import TransformersGenerator

    t = time.perf_counter()
    model = _llama8b()
    out: dict = {
        "model": "Llama-8B shape (32 layers, 4096 hidden, GQA 32/8), random bf16 weights",
        "params_B": round(sum(p.numel() for p in model.parameters()) / 1e9, 2),
        "build_s": round(time.perf_counter() - t, 1),
        "attn": model.config._attn_implementation,
        "cases": {},
    }
    gen = TransformersGenerator(model, None, cache_bytes=16 << 30)
    gen.eos_ids = set()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)

    def rand_ids(n: int) -> list[int]:
        return torch.randint(10, vocab - 10, (n,), generator=g).tolist()

    # (cached prefix, new suffix): a question after a standing block; the LoCoMo layout (3k standing +
    # 1k fresh evidence); a long profile.
    cases = [(2048, 32), (3072, 1024), (8192, 64), (16384, 64)] if not quick else [(2048, 32)]
    # The floor of any reuse: one eager forward of a few tokens (launch-bound, weights read once).
    with torch.inference_mode():
        for n in (1, 32):
            x = torch.randint(10, 1000, (1, n), device="cuda")
            out[f"forward_ms_{n}_tokens_no_cache"] = round(
                cuda_ms(lambda x=x: model(input_ids=x, logits_to_keep=1), reps=10), 2
            )
        x = torch.randint(10, 1000, (1, 32), device="cuda")
        prof_ms = cuda_ms(lambda x=x: model.model.embed_tokens(x), reps=10)
        out["embed_only_ms"] = round(prof_ms, 3)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(input_ids=x, logits_to_keep=1)
            torch.cuda.synchronize()
        ev = prof.key_averages()
        out["one_forward_cuda_kernel_ms"] = round(sum(e.self_device_time_total for e in ev) / 1e3, 2)
        out["one_forward_kernel_launches"] = int(
            sum(e.count for e in ev if e.key.startswith("cudaLaunchKernel"))
        )
    reps = 5
    for prefix_len, suffix_len in cases:
        prefix = rand_ids(prefix_len)
        cold, reuse, match_tokens, same = [], [], [], 0
        tps_cold, tps_reuse = [], []
        gen.generate_ids(prefix + rand_ids(suffix_len), max_new_tokens=4, use_cache=False)  # warm-up
        for _ in range(reps):
            gen.kv_cache.clear()
            gen.generate_ids(
                prefix + rand_ids(suffix_len), max_new_tokens=1, use_cache=True
            )  # seeds the prefix
            prompt = prefix + rand_ids(suffix_len)
            a, ra = gen.generate_ids(prompt, max_new_tokens=16, use_cache=False)
            b, rb = gen.generate_ids(prompt, max_new_tokens=16, use_cache=True)
            cold.append(ra.ttft_s * 1e3)
            reuse.append(rb.ttft_s * 1e3)
            tps_cold.append(ra.tokens_per_s)
            tps_reuse.append(rb.tokens_per_s)
            match_tokens.append(rb.cached_tokens)
            same += a == b
        # What an engine that copies the cached prefix (deepcopy of a DynamicCache) pays before prefill.
        from transformers.cache_utils import DynamicCache

        kv = DynamicCache()
        with torch.inference_mode():
            model(
                input_ids=torch.tensor([prefix], device="cuda"),
                past_key_values=kv,
                use_cache=True,
                logits_to_keep=1,
            )
        copy_ms = cuda_ms(lambda kv=kv: copy.deepcopy(kv), reps=5, warmup=1)
        kv_bytes = sum(layer.keys.numel() * 2 * layer.keys.element_size() for layer in kv.layers)
        del kv
        c, r = statistics.median(cold), statistics.median(reuse)
        out["cases"][f"prefix{prefix_len}+new{suffix_len}"] = {
            "prompt_tokens": prefix_len + suffix_len,
            "cached_tokens_median": statistics.median(match_tokens),
            "ttft_ms_cold_p50": round(c, 2),
            "ttft_ms_reuse_p50": round(r, 2),
            "ttft_ratio": round(c / r, 2),
            "decode_tokens_per_s_cold": round(statistics.median(tps_cold), 1),
            "decode_tokens_per_s_reuse": round(statistics.median(tps_reuse), 1),
            "greedy_identical_runs": f"{same}/{reps}",
            "prefix_kv_MB": round(kv_bytes / 1e6, 1),
            "deepcopy_prefix_ms": round(copy_ms, 2),
        }
        torch.cuda.empty_cache()
    out["kv_cache"] = gen.kv_cache.stats.as_dict()
    return out


def table(results: dict) -> str:
    lines = []
    cp = results.get("copy", {})
    lines.append(f"copy rate: {cp.get('copy_GBps_read_plus_write')} GB/s (read+write)")
    for key, v in results.get("search", {}).get("variants", {}).items():
        if "error" in v:
            lines.append(f"search {key:28s} ERROR {v['error'][:80]}")
        else:
            lines.append(
                f"search {key:28s} {v['ms']:8.4f} ms {v['GBps_scanned']:8.1f} GB/s "
                f"({v['share_of_copy_rate']}) recall {v['recall_vs_fp32']}"
            )
    for key, v in results.get("encoder", {}).items():
        lines.append(f"encoder {key}: {v}")
    gen = results.get("generate", {})
    lines.append(
        "generate floor: "
        + ", ".join(f"{k}={v}" for k, v in gen.items() if k.startswith(("forward", "one_", "embed")))
    )
    for key, v in gen.get("cases", {}).items():
        lines.append(
            f"generate {key:22s} cold {v['ttft_ms_cold_p50']:8.2f} ms reuse {v['ttft_ms_reuse_p50']:7.2f} ms "
            f"x{v['ttft_ratio']:6.2f} deepcopy {v['deepcopy_prefix_ms']} ms identical {v['greedy_identical_runs']}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--sections", default="copy,search,encoder,generate")
    ap.add_argument("--texts", default=os.environ.get("MEMSTAGE_BENCH_TEXTS"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    results: dict = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "sections": {},
    }
    try:
        import transformers

        results["transformers"] = transformers.__version__
    except ImportError:
        pass
    for name in args.sections.split(","):
        t = time.perf_counter()
        try:
            if name == "copy":
                results["copy"] = section_copy()
            elif name == "search":
                results["search"] = section_search(results.get("copy", {}).get("copy_GBps_read_plus_write"))
            elif name == "encoder":
                results["encoder"] = section_encoder(args.texts)
            elif name == "generate":
                results["generate"] = section_generate(args.quick)
            results["sections"][name] = f"ok in {time.perf_counter() - t:.1f} s"
        except Exception as exc:
            results["sections"][name] = f"failed: {type(exc).__name__}: {exc}"[:500]
            traceback.print_exc()
        torch.cuda.empty_cache()  # the section's tensors died with its frame
        print(f"[{name}] {results['sections'][name]}", file=sys.stderr, flush=True)
        if args.out:  # keep what is done so far if a later section dies
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results), file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
