"""Learned fusion under leave-one-conversation-out (LOCO): the hand weights of `tasks.scoring` against
weights fitted by `tasks.fusion_fit` on other conversations, on the dev split and every robustness
variant, through the real retrieval and packing path (`Retriever.retrieve`), in one run.

Per file (dev, then the variants of `tasks/robustness.py`, seed 0), each in its own data directory
prepared once as `memstage eval locomo` prepares it (ingest, index, the maintenance chain; kept under
`--work` so a second run reuses them), the questions are asked with:
- `hand`: today's scoring (`tasks.scoring.score_rows`);
- `learned_dev`: for each conversation, the weights fitted on the dev split's other conversations
  (four: the file holds five, 760 questions with evidence) (`fit_listwise`), so no question is
  scored by weights fitted on its conversation;
- `learned_mix`: the same, fitted on the other conversations in the dev split and every
  variant together (a variant's copy of the held-out conversation is never trained on).
The learned scorer replaces `score_rows` in this process only (`tasks.fusion.scorer`). The keep
rule (issue 15): a learned scorer is kept only if its recall@1000 is at least the hand scoring's on
the dev split (LOCO) and on every variant. Also printed: the weights fitted on all of dev (what would
be committed), and the configurations tried before this run (`TRIED`, from a replay of the packing).

    python bench/fusion_cv.py --data ../shared/data/locomo/locomo-dev.json --work /tmp/fusion \
        --out bench/results/fusion_cv_cpu.json --table bench/results/fusion_cv_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

BUDGETS = (250, 500, 1000, 2000)
MODELS = ("hand", "learned_dev", "learned_mix")
# Configurations compared before this run on LOCO recall@1000 with a replay of the packing (the same
# rows, scores, token counts and duplicate rule; it matched the real path's hand figures to 4
# digits): dev / speakers / dated / padded / long, each fitted on the other conversations of dev.
TRIED = {
    "hand (fixed)": [0.8688, 0.8690, 0.9004, 0.8426, 0.7776],
    "pairwise logistic, 7 features": [0.8642, 0.8703, 0.8991, 0.8355, 0.7599],
    "listwise, 7 features, prior 0.01 (chosen)": [0.8642, 0.8668, 0.9010, 0.8499, 0.7812],
    "listwise, 7 features, prior 0.1": [0.8643, 0.8669, 0.9018, 0.8479, 0.7738],
    "listwise, 7 features, prior 1": [0.8618, 0.8659, 0.9009, 0.8419, 0.7765],
    "listwise, 8 features (+log_tokens), prior 0.01 (dev only)": [0.8608, None, None, None, None],
    "listwise, 8 features (+log_tokens), prior 0.1": [0.8582, 0.8564, 0.9061, 0.8435, 0.7563],
}


def prepare(data: Path, work: Path, variants: tuple[str, ...]) -> dict[str, tuple[Path, Path]]:
    """name -> (file, prepared data directory); a directory with `prepared.json` is reused."""
    from memstage.cli.eval_commands import prepare_store
    from memstage.tasks.robustness import write_variants

    paths = {"dev": data.resolve(), **write_variants(data, work / "variants", variants, 0)}
    out = {}
    for name, path in paths.items():
        home = work / f"home-{name}"
        if not (home / "prepared.json").exists():
            steps = prepare_store(path, home)
            (home / "prepared.json").write_text(json.dumps({"path": str(path), "steps": steps}))
        out[name] = (path, home)
    return out


def retriever_for(home: Path) -> Any:
    from memstage.cli.eval_commands import _encoder
    from memstage.gpu.tokenizer import TokenCounter
    from memstage.settings import get_settings
    from memstage.stores.store import MemoryStore
    from memstage.tasks.retrieve import Retriever

    store = MemoryStore(home)
    return Retriever(store, _encoder(), TokenCounter(get_settings().models or store.models_dir()))


def ask(retriever: Any, questions: list, weights: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """Recall per budget over `questions`, each conversation's scored by `weights[conversation]`
    (the hand scoring when None), through `Retriever.retrieve`."""
    from memstage.tasks import retrieve
    from memstage.tasks.evaluate import own_memories, run_questions, summarise
    from memstage.tasks.fusion import scorer

    records = []
    hand = retrieve.score_rows
    for conv in sorted({q.namespace for q in questions}):
        mine = [q for q in questions if q.namespace == conv]
        owns = {conv: own_memories(retriever.store, conv)}
        retriever.retrieve(conv, "warm up", 10)
        retrieve.score_rows = hand if weights is None else scorer(weights[conv])
        try:
            got = run_questions(retriever.retrieve, mine, owns, BUDGETS)
        finally:
            retrieve.score_rows = hand
        records += got
    out = summarise(records)
    out["by_conversation_1000"] = {
        c: round(
            float(np.mean([r["recall"] for r in records if r["namespace"] == c and r["budget"] == 1000])), 4
        )
        for c in sorted({r["namespace"] for r in records})
    }
    return {k: out[k] for k in ("recall", "by_category", "latency_ms", "questions", "by_conversation_1000")}


def fits(samples: dict[str, list]) -> dict[str, Any]:
    """Per-fold weights for learned_dev and learned_mix, and the weights fitted on all of dev."""
    from memstage.tasks.fusion_fit import fit_listwise, fold_samples, loco_folds

    pool = [s for ss in samples.values() for s in ss]
    folds = loco_folds(s.conversation for s in samples["dev"])
    dev = {held: fit_listwise(fold_samples(samples["dev"], train, held)) for held, train in folds}
    mix = {held: fit_listwise(fold_samples(pool, train, held)) for held, train in folds}
    return {"learned_dev": dev, "learned_mix": mix, "full_dev": fit_listwise(samples["dev"])}


def named(w: np.ndarray) -> dict[str, float]:
    from memstage.tasks.fusion import FEATURES

    return {f: round(float(v), 4) for f, v in zip(FEATURES, w, strict=True)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from memstage.cli.eval_commands import _one_thread
    from memstage.tasks.evaluate import load_questions
    from memstage.tasks.fusion import hand_weights
    from memstage.tasks.fusion_fit import collect

    result: dict[str, Any] = {
        **study_header("fusion_cv.py"),
        "tried_before_run_recall_1000": {"files": ["dev", "speakers", "dated", "padded", "long"], **TRIED},
    }
    files = prepare(args.data, args.work, tuple(args.variants))
    _one_thread()
    retrievers = {name: retriever_for(home) for name, (_, home) in files.items()}
    questions = {name: load_questions(path).items for name, (path, _) in files.items()}
    start = time.perf_counter()
    samples = {name: collect(retrievers[name], questions[name], name) for name in files}
    weights = fits(samples)
    result["fit_s"] = round(time.perf_counter() - start, 1)
    result["weights"] = {
        "hand": named(hand_weights()),
        "full_dev": named(weights["full_dev"]),
        **{m: {c: named(w) for c, w in weights[m].items()} for m in ("learned_dev", "learned_mix")},
    }
    result["files"] = {}
    for name in files:
        per = {}
        for model in MODELS:
            per[model] = ask(retrievers[name], questions[name], weights.get(model))
        per["learned_minus_hand_1000"] = {
            m: round(per[m]["recall"]["1000"] - per["hand"]["recall"]["1000"], 4) for m in MODELS[1:]
        }
        result["files"][name] = per
        print(name, json.dumps({m: per[m]["recall"] for m in MODELS}), flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    result["kept"] = {
        m: all(f["learned_minus_hand_1000"][m] >= 0 for f in result["files"].values()) for m in MODELS[1:]
    }
    result["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Learned fusion, leave-one-conversation-out (`{result['command']}`; {result['machine']}; "
        f"start: {result['uptime_start']}; end: {result.get('uptime_end', '-')}).",
        "",
        "| file | scoring | " + " | ".join(str(b) for b in BUDGETS) + " | p95 ms @1000 |",
        "|" + " --- |" * (3 + len(BUDGETS)),
    ]
    for name, per in result["files"].items():
        for m in MODELS:
            r = per[m]
            lines.append(
                f"| {name} | {m} | "
                + " | ".join(f"{r['recall'][str(b)]:.3f}" for b in BUDGETS)
                + f" | {r['latency_ms']['1000']['p95']:.1f} |"
            )
    lines += ["", f"kept (recall@1000 >= hand on dev and every variant): {result.get('kept')}", ""]
    lines += ["weights fitted on all of dev: " + json.dumps(result["weights"]["full_dev"])]
    lines += ["hand weights: " + json.dumps(result["weights"]["hand"])]
    return "\n".join(lines) + "\n"


def study_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every study over prepared data directories takes (this bench, fusion_weighted,
    passage_split): --data, --work, --out, --table."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="prepared data directories (kept)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--table", type=Path, default=None)
    return ap


def study_header(script: str) -> dict[str, Any]:
    """The fields a study's result starts with: its command line, the machine, the load at the start."""
    return {
        "command": f"python bench/{script} " + " ".join(sys.argv[1:]),
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs (shared with other agents), "
        f"{platform.python_version()}",
        "uptime_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }


def write_report(result: dict[str, Any], args: argparse.Namespace, table: str) -> None:
    """The JSON to --out, the markdown table to --table when given, and the table printed."""
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.table:
        args.table.write_text(table)
    print(table)


def main() -> None:
    from memstage.tasks.robustness import VARIANTS

    ap = study_parser(__doc__)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = ap.parse_args()
    result = run(args)
    print(json.dumps({k: result[k] for k in ("kept", "uptime_start", "uptime_end")}))
    write_report(result, args, markdown(result))


if __name__ == "__main__":
    main()
