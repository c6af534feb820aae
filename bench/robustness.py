"""Robustness: memstage's evidence recall on the dev split and on each robustness variant, beside the
raw-turn baselines (dense, BM25, RRF) measured in the same run, per budget and per category.

The variants come from `tasks/robustness.py` (generated from the file, seed 0); each is evaluated like
`memstage eval locomo FILE --baselines` (its own data directory, the maintenance chain; no exhaustive
reference). Then, on the same store, memstage at 1000 tokens with each cue fitted on the dev split's
surface switched off (ABLATIONS: the named-speaker boosts, the names learned for the speakers
(`tasks.names`), the date-period boost, and the dense/BM25 mix at 0.5 instead of 0.7), set by patching `tasks.scoring`'s module constants in this process only.
The JSON is rewritten after each file, so a run cut short keeps what it measured; a markdown table
beside it (`--table`).

    python bench/robustness.py --data ../shared/data/locomo/locomo-dev.json \
        --out bench/results/robustness_cpu.json --table bench/results/robustness_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ABLATIONS = {
    "no_speaker_cue": {"SPEAKER": 0.0, "SPEAKER_SESSION": 0.0},
    "no_speaker_names": {"SPEAKER_NAMES": False},
    "no_period_cue": {"PERIOD": 0.0},
    "mix_0.5": {"W_DENSE": 0.5},
}
KEEP = ("recall", "by_category", "tokens", "latency_ms", "questions", "conversations", "questions_dated")


def trimmed(report: dict[str, Any], dev: dict[str, Any] | None) -> dict[str, Any]:
    out = {k: report[k] for k in KEEP if k in report}
    out["baselines"] = {m: {k: r[k] for k in KEEP if k in r} for m, r in report.get("baselines", {}).items()}
    out["prepare_s"] = report.get("steps", {}).get("prepare_s")
    if dev is not None:
        out["minus_dev"] = {b: round(report["recall"][b] - dev["recall"][b], 4) for b in report["recall"]}
    return out


def ablations(home: Path, path: Path, budget: int = 1000) -> dict[str, Any]:
    """memstage's recall at `budget` on the prepared store at `home`, with each ablation applied."""
    from memstage.cli.eval_commands import _encoder
    from memstage.gpu.tokenizer import TokenCounter
    from memstage.settings import get_settings
    from memstage.stores.store import MemoryStore
    from memstage.tasks import scoring
    from memstage.tasks.evaluate import load_questions, own_memories, run_questions, summarise
    from memstage.tasks.retrieve import Retriever

    store = MemoryStore(home)
    questions = load_questions(path).items
    owns = {ns: own_memories(store, ns) for ns in {q.namespace for q in questions}}
    retriever = Retriever(store, _encoder(), TokenCounter(get_settings().models or store.models_dir()))
    out = {}
    for name, patch in ABLATIONS.items():
        saved = {k: getattr(scoring, k) for k in patch}
        try:
            for k, v in patch.items():
                setattr(scoring, k, v)
            r = summarise(run_questions(retriever.retrieve, questions, owns, (budget,)))
        finally:
            for k, v in saved.items():
                setattr(scoring, k, v)
        out[name] = {"recall": r["recall"], "by_category": r["by_category"]}
    return out


WORDS = re.compile(r"[a-z0-9']{4,}")


def original_words(dev_path: Path) -> dict[tuple[str, str], set[str]]:
    """(conversation, dia_id) -> the content words (4+ letters) of that turn in the dev file: what an
    evidence turn said before a variant set it among other text."""
    from memstage.tasks.robustness import load_samples, sessions

    return {
        (s["sample_id"], t["dia_id"]): set(WORDS.findall(str(t.get("text", "")).lower()))
        for s in load_samples(dev_path)
        for n in sessions(s["conversation"])
        for t in s["conversation"][f"session_{n}"]
        if isinstance(t, dict)
    }


def strict_credit(
    result: dict[str, Any], q: Any, owns: dict[str, set[str]], original: dict[tuple[str, str], set[str]]
) -> float:
    """Share of `q`'s evidence turns of which a packed memory (the turn, one of its passages or an
    excerpt of either: the text as packed) holds at least half the turn's original content words."""
    packed = {m["memory_id"]: m["text"] for m in result["memories"]}
    hits = 0
    for d in q.evidence:
        want = original.get((q.namespace, d), set())
        held = owns.get(d, set()) & set(packed)
        hits += any(len(want & set(WORDS.findall(packed[m].lower()))) >= len(want) / 2 for m in held)
    return hits / len(q.evidence)


def strict_long(home: Path, path: Path, dev_path: Path, budgets: tuple[int, ...]) -> dict[str, float]:
    """memstage's recall on the `long` file with strict credit (`strict_credit`): an evidence turn
    counts only when a packed memory of it holds at least half of the turn's original content words
    (words of 4+ letters of the dev file's text), so a packed passage of filler around the evidence
    earns nothing. The eval's credit is per turn (any of its level-0 memories)."""
    from memstage.cli.eval_commands import _encoder
    from memstage.gpu.tokenizer import TokenCounter
    from memstage.settings import get_settings
    from memstage.stores.store import MemoryStore
    from memstage.tasks.evaluate import load_questions, own_memories
    from memstage.tasks.retrieve import Retriever

    original = original_words(dev_path)
    store = MemoryStore(home)
    questions = load_questions(path).items
    owns = {ns: own_memories(store, ns) for ns in {q.namespace for q in questions}}
    retriever = Retriever(store, _encoder(), TokenCounter(get_settings().models or store.models_dir()))
    out = {}
    for budget in budgets:
        total = sum(
            strict_credit(retriever.retrieve(q.namespace, q.question, budget), q, owns[q.namespace], original)
            for q in questions
        )
        out[str(budget)] = round(total / max(len(questions), 1), 4)
    return out


def markdown(result: dict[str, Any]) -> str:
    files = result["files"]
    budgets = list(next(iter(files.values()))["recall"])
    head = (
        "| file | method | "
        + " | ".join(budgets)
        + " | "
        + " | ".join(f"{c} @1000" for c in ("multi-hop", "temporal", "open-domain", "single-hop"))
    )
    lines = [
        f"Evidence recall per token budget, and per category at 1000 tokens (`{result['command']}`; "
        f"{result['machine']}).",
        "",
        head + " |",
        "|" + " --- |" * (2 + len(budgets) + 4),
    ]
    for name, r in files.items():
        for method, m in [("memstage", r), *r["baselines"].items()]:
            cats = m["by_category"].get("1000", {})
            lines.append(
                f"| {name} | {method} | "
                + " | ".join(f"{m['recall'][b]:.3f}" for b in budgets)
                + " | "
                + " | ".join(
                    f"{cats[c]:.3f}" if c in cats else "-"
                    for c in ("multi-hop", "temporal", "open-domain", "single-hop")
                )
                + " |"
            )
    lines += ["", "memstage minus dev: " + "; ".join(
        f"{n} " + " ".join(f"{v:+.3f}" for v in r["minus_dev"].values()) for n, r in files.items() if "minus_dev" in r
    )]  # fmt: skip
    for n, r in files.items():
        if "strict_recall" in r:
            lines += ["", f"{n} with strict credit (a packed memory of the turn holds half its original words): "
                      + " ".join(f"{v:.3f}" for v in r["strict_recall"].values())]  # fmt: skip
    names = list(ABLATIONS)
    lines += ["", "memstage at 1000 tokens with a cue switched off:", "",
              "| file | all cues | " + " | ".join(names) + " |", "|" + " --- |" * (2 + len(names))]  # fmt: skip
    for n, r in files.items():
        if "ablations_at_1000" in r:
            a = r["ablations_at_1000"]
            lines.append(
                f"| {n} | {r['recall']['1000']:.3f} | "
                + " | ".join(f"{a[k]['recall']['1000']:.3f}" for k in names)
                + " |"
            )
    return "\n".join(lines) + "\n"


def merge(paths: list[Path], out: Path, table: Path | None) -> None:
    """Runs split over processes, as one result: files in order, each variant's minus_dev against dev."""
    runs = [json.loads(p.read_text()) for p in paths]
    result = {
        "command": " && ".join(r["command"] for r in runs) + " && python bench/robustness.py --merge ...",
        "machine": "; ".join(r["machine"] for r in runs),
        "seed": runs[0]["seed"],
        "files": {n: f for r in runs for n, f in r["files"].items()},
    }
    dev = result["files"].get("dev")
    for name, f in result["files"].items():
        if dev is not None and name != "dev":
            f["minus_dev"] = {b: round(f["recall"][b] - dev["recall"][b], 4) for b in f["recall"]}
    out.write_text(json.dumps(result, indent=1) + "\n")
    if table:
        table.write_text(markdown(result))


def main() -> None:
    from memstage.cli.eval_commands import evaluate_locomo
    from memstage.tasks.robustness import VARIANTS, write_variants

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--merge", type=Path, nargs="+", default=None, help="combine runs' JSON (dev in one)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[250, 500, 1000, 2000])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--table", type=Path, default=None)
    ap.add_argument("--no-dev", action="store_true", help="the variants only (another run measured dev)")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out, args.table)
    result: dict[str, Any] = {
        "command": "python bench/robustness.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs (shared with other agents), "
        f"{platform.python_version()}, load average at start {os.getloadavg()[0]:.1f}",
        "seed": args.seed,
        "files": {},
    }
    with tempfile.TemporaryDirectory(prefix="memstage-robustness-") as folder:
        paths = {} if args.no_dev else {"dev": args.data}
        paths.update(write_variants(args.data, folder, tuple(args.variants), args.seed))
        for name, path in paths.items():
            start = time.perf_counter()
            home = Path(folder) / f"home-{name}"
            report = evaluate_locomo(
                path, budgets=tuple(args.budgets), baselines=True, exhaustive=False, home=home
            )
            result["files"][name] = trimmed(report, result["files"].get("dev"))
            result["files"][name]["ablations_at_1000"] = ablations(home, path)
            if name == "long":
                result["files"][name]["strict_recall"] = strict_long(
                    home, path, args.data, tuple(args.budgets)
                )
            result["files"][name]["seconds"] = round(time.perf_counter() - start, 1)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
            if args.table:
                args.table.write_text(markdown(result))
            print(f"{name}: " + json.dumps(result["files"][name]["recall"]), flush=True)


if __name__ == "__main__":
    main()
