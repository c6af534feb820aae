"""Host work of the batched encoder per text: tokenising and padding, the part a GPU waits on.

On a GPU host the encoder's forward pass is cheap (MiniLM, fp16) and the host work bounds it
(bench/results/ingest_gpu_h200.json: 21k texts/s, about 440 us of actor CPU per text). This times,
on the same texts in the same run, the host work alone (no model) of:
  * previous: `Encoder.token_ids` (threaded Rust slices, then one `.ids` list per text) plus the
    per-text NumPy copy into a padded batch that the previous `_encode_cuda` did;
  * current: `Encoder.tokenise_batches` (length-sorted batches, each tokenised and padded on the pool);
  * sentence-transformers' `tokenize` per 1,024 texts (what its `encode` does per batch).
Reports texts/s (wall) and CPU-us per text (this process's CPU, all threads).

    python bench/encoder_host.py --texts 50000 --out bench/results/encoder_host_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def texts_of(data: Path, n: int) -> list[str]:
    from memstage.tasks.index import level0_text

    out = []
    for sample in json.loads(data.read_text()):
        conv = sample["conversation"]
        for key, turns in conv.items():
            if key.startswith("session_") and isinstance(turns, list):
                out += [level0_text(t["speaker"], t["text"], t) for t in turns]
    return [out[k % len(out)] + ("" if k < len(out) else f" #{k // len(out)}") for k in range(n)]


def previous(enc, texts: list[str], batch: int) -> None:
    """The previous `_encode_cuda` host work, verbatim but for the model."""
    ids = enc.token_ids(texts)
    lengths = np.fromiter((len(t) for t in ids), dtype=np.int64, count=len(ids))
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        arr = np.full((len(idx), int(lengths[idx[0]])), 0, dtype=np.int64)
        for r, i in enumerate(idx):
            arr[r, : lengths[i]] = ids[i]


def current(enc, texts: list[str], batch: int) -> None:
    for _, future in enc.tokenise_batches(texts, batch):
        future.result()


def st_tokenize(enc, texts: list[str], batch: int) -> None:
    for i in range(0, len(texts), batch):
        enc.model.tokenize(texts[i : i + batch])


def timed(fn, enc, texts: list[str], call: int, batch: int, repeat: int) -> dict[str, float]:
    best = None
    for _ in range(repeat):
        cpu0, t0 = time.process_time(), time.perf_counter()
        for i in range(0, len(texts), call):
            fn(enc, texts[i : i + call], batch)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        if best is None or wall < best[0]:
            best = (wall, cpu)
    wall, cpu = best
    return {"texts_per_s": round(len(texts) / wall, 1), "cpu_us_per_text": round(cpu / len(texts) * 1e6, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/locomo/locomo-dev.json")
    ap.add_argument("--texts", type=int, default=20000)
    ap.add_argument("--call", type=int, default=4096, help="texts per encode call (the flow's GPU chunk)")
    ap.add_argument("--batch", type=int, default=1024, help="the encoder's batch size on CUDA")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from memstage.gpu.encoder import Encoder

    enc = Encoder(device="cpu")
    texts = texts_of(args.data, args.texts)
    enc.tokenise_batches(texts[:512], args.batch)  # the pool and the Rust tokenizer, made once
    rows = {name: timed(fn, enc, texts, args.call, args.batch, args.repeat)
            for name, fn in (("previous", previous), ("current", current), ("sentence_transformers", st_tokenize))}  # fmt: skip
    threads = enc._pool._max_workers
    result = {
        "texts": len(texts),
        "texts_per_call": args.call,
        "tokenizer_threads": threads,
        "host_work": rows,
        "speedup_wall": round(rows["current"]["texts_per_s"] / rows["previous"]["texts_per_s"], 2),
        "speedup_cpu": round(rows["previous"]["cpu_us_per_text"] / rows["current"]["cpu_us_per_text"], 2),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{os.uname().nodename}: {os.cpu_count()} CPUs (shared)",
        "command": "python " + " ".join(sys.argv),
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    print(f"\n{'host work':<24}{'texts/s':>12}{'CPU us/text':>14}", file=sys.stderr)
    for name, r in rows.items():
        print(f"{name:<24}{r['texts_per_s']:>12.0f}{r['cpu_us_per_text']:>14.1f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
