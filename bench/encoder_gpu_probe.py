"""Where the bare GPU encoder's time goes: tokenising alone, the forward pass alone, whole encode calls.

    TOKENIZERS_PARALLELISM=false python bench/encoder_gpu_probe.py --data locomo-dev.json [--ab] \
        --out bench/results/encoder_probe_h200.json

On N LoCoMo turns (replicated, each made distinct), with the `Encoder` on CUDA: texts/s and CPU-us per
text of `Encoder.encode` called on 4,096 texts (the ingest flow's chunk) and 32,768; of
`tokenise_batches` alone; and of the model's forward pass alone over the same tokenised batches.
`--ab`: milliseconds per forward pass of the longest and the median batch, at batch sizes 1,024 and
4,096, with and without cuDNN's attention kernel, and whole-encode rates for the four combinations.
Needs CUDA (exits 2 without it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def texts_of(data: Path, n: int) -> list[str]:
    out = []
    for sample in json.loads(data.read_text()):
        for key, turns in sample["conversation"].items():
            if key.startswith("session_") and isinstance(turns, list):
                out += [f"{t['speaker']}: {t['text']}" for t in turns]
    return [out[k % len(out)] + ("" if k < len(out) else f" #{k // len(out)}") for k in range(n)]


def rate(torch, fn, texts: list[str], call: int) -> dict[str, float]:
    torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), call):
        fn(texts[i : i + call])
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    return {
        "texts_per_s": round(len(texts) / wall),
        "cpu_us_per_text": round((time.process_time() - c) / len(texts) * 1e6, 1),
    }


def forward_ms(torch, bert, ids: np.ndarray, k: int = 10) -> float:
    x = torch.from_numpy(ids).cuda()
    m = (x != 0).long()
    with torch.inference_mode():
        bert(input_ids=x, attention_mask=m)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(k):
            bert(input_ids=x, attention_mask=m)
        torch.cuda.synchronize()
    return round((time.perf_counter() - t) / k * 1000, 2)


def ab(torch, enc, texts: list[str]) -> dict[str, float]:
    bert, out = enc.model[0].auto_model, {}
    for bs in (1024, 4096):
        batches = [f.result() for _, f in enc.tokenise_batches(texts, bs)]
        for name, ids in (("longest", batches[0]), ("median", batches[len(batches) // 2])):
            for cudnn in (True, False):
                torch.backends.cuda.enable_cudnn_sdp(cudnn)
                out[f"bs{bs}_{name}_{tuple(ids.shape)}_cudnn{int(cudnn)}_ms"] = forward_ms(torch, bert, ids)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--texts", type=int, default=131072)
    ap.add_argument("--ab", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("encoder_gpu_probe: needs CUDA", file=sys.stderr)
        return 2
    from memstage.gpu.encoder import Encoder

    texts = texts_of(args.data, args.texts)
    enc = Encoder(device="cuda")
    enc.encode(texts[:4096])
    out = {"texts": len(texts), "cpus": os.cpu_count(), "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM"),
           "torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "command": "python " + " ".join(sys.argv)}  # fmt: skip
    for call in (4096, 32768):
        out[f"encode_call_{call}"] = rate(torch, enc.encode, texts, call)
        tok = lambda t: [f.result() for _, f in enc.tokenise_batches(t, enc.batch_size)]  # noqa: E731
        out[f"tokenise_only_call_{call}"] = rate(torch, tok, texts, call)
    batches = [f.result() for _, f in enc.tokenise_batches(texts, enc.batch_size)]
    torch.cuda.synchronize()
    t = time.perf_counter()
    for ids in batches:
        forward_ms(torch, enc.model[0].auto_model, ids, k=1)
    out["forward_only_texts_per_s"] = round(len(texts) / (time.perf_counter() - t) / 2)  # each ran twice
    if args.ab:
        out["ab"] = ab(torch, enc, texts)
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
