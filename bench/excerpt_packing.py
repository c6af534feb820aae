"""Packing modes: every memory packed whole against packing that leaves out the sentences already
packed (`tasks.repeats`) and packing that cuts each long level-0 memory to its sentences nearest the
question (`tasks.excerpt`), on the same prepared stores in the same run, loose and strict credit.

Files: the dev split and the robustness variants of `tasks/robustness.py` (seed 0), as prepared
before by bench/fusion_cv.py (`--work/home-<file>`) and, for the files with long turns (`long`,
`assistant`, `ontopic`, split by topic: today's default), by bench/passage_split.py
(`--work/split-topic/home-<file>`). Nothing is prepared here: a missing directory is an error.
Per file, mode and budget: recall with the eval's credit (per turn: any level-0 memory of the turn
packed, `tasks.evaluate.question_recall`) and with strict credit (bench/robustness.strict_credit: the
packed text, excerpt or whole, holds at least half the evidence turn's original content words, read
from the dev file), mean tokens packed, retrieve latency p50/p95. One `Retriever.retrieve` call per
question and budget feeds both credits.

Modes: `whole` (every memory whole; exact copies of a packed memory skipped, as before
`tasks.repeats`), `repeats` (with `--repeats`: the sentences already packed left out, today's
default), `excerptW` (a memory of more than W words cut to its best run of sentences
within W words), `densityD` (packing order by score less D per doubling of a memory's tokens over
DENSITY_REF: score per token breaks near-ties; no text is cut). Neither parameter is tuned on the
variants: on the dev split (`--files dev`), `loco` gives, for each dev conversation, the mode run
with the best strict recall averaged over the budgets on the other conversations (ties to the mode
that changes less: whole first, then W from large to small, D from small to large), and that
choice's figures on the held-out conversation; `chosen_on_all_dev` is the choice on all of dev.

    python bench/excerpt_packing.py --data ../shared/data/locomo/locomo-dev.json --work /tmp/fusion2 \\
        --files dev --words 20 30 40 60 --out /tmp/excerpt_dev.json      # the choice of W on dev
    python bench/excerpt_packing.py --data ../shared/data/locomo/locomo-dev.json --work /tmp/fusion2 \\
        --words 40 --out bench/results/excerpt_packing_cpu.json --table bench/results/excerpt_packing_cpu.md
    python bench/excerpt_packing.py --data ../shared/data/locomo/locomo-dev.json --work /tmp/fusion2 \\
        --words --repeats --out bench/results/repeats_cpu.json --table bench/results/repeats_cpu.md
Every mode but `repeats` packs with `drop_repeats` off, so the figures of the modes measured before
it stay comparable.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusion_cv import BUDGETS, retriever_for, study_header, study_parser, write_report  # noqa: E402
from passage_split import uptime  # noqa: E402
from robustness import original_words, strict_credit  # noqa: E402

ANSWER = re.compile(r"[a-z0-9']{3,}")
STOP = {"the", "and", "for", "was", "her", "his", "she", "they", "their", "with", "from", "that", "this"}
FILES = ("dev", "speakers", "padded", "dated", "long", "assistant", "ontopic")
SPLIT = ("long", "assistant", "ontopic")


def home_of(work: Path, name: str) -> tuple[Path, Path | None]:
    """(prepared data directory, its variant file; None for dev)."""
    home = work / ("split-topic" if name in SPLIT else "") / f"home-{name}"
    if not (home / "prepared.json").exists():
        raise SystemExit(f"{home} is not prepared (bench/fusion_cv.py or bench/passage_split.py does it)")
    return home, None if name == "dev" else work / "variants" / f"{name}.json"


def ask(retriever: Any, questions: list, original: dict) -> list[dict[str, Any]]:
    """One record per (question, budget): loose and strict credit, tokens, excerpts, latency."""
    from memstage.tasks.evaluate import own_memories, question_recall

    owns = {ns: own_memories(retriever.store, ns) for ns in sorted({q.namespace for q in questions})}
    for ns in owns:
        retriever.retrieve(ns, "warm up", 10)
    records = []
    for q in questions:
        dated = {"as_of": q.as_of} if q.as_of is not None else {}
        for budget in BUDGETS:
            start = time.perf_counter()
            result = retriever.retrieve(q.namespace, q.question, budget, **dated)
            latency = (time.perf_counter() - start) * 1000
            assert result["tokens"] <= budget, (result["tokens"], budget)
            records.append(
                {
                    "namespace": q.namespace,
                    "budget": budget,
                    "loose": question_recall(result, q.evidence, owns[q.namespace]),
                    "strict": strict_credit(result, q, owns[q.namespace], original),
                    "answer": answer_credit(result, q, owns[q.namespace]),
                    "tokens": result["tokens"],
                    "memories": len(result["memories"]),
                    "excerpts": sum(bool(m.get("excerpt")) for m in result["memories"]),
                    "latency_ms": latency,
                }
            )
    return records


def answer_credit(result: dict[str, Any], q: Any, owns: dict[str, set[str]]) -> float | None:
    """1 when a packed memory of one of `q`'s evidence turns (its text as packed) holds at least half
    the gold answer's words (3+ characters, a few function words out); None for an answer with none."""
    want = set(ANSWER.findall(str(q.answer).lower())) - STOP
    if not want:
        return None
    mine = set().union(*(owns.get(d, set()) for d in q.evidence))
    texts = [m["text"].lower() for m in result["memories"] if m["memory_id"] in mine]
    return float(any(len(want & set(ANSWER.findall(t))) >= len(want) / 2 for t in texts))


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str, b: int) -> float:
        return round(float(np.mean([r[key] for r in records if r["budget"] == b])), 4)

    out: dict[str, Any] = {k: {str(b): mean(k, b) for b in BUDGETS} for k in ("loose", "strict")}
    out["answer"] = {
        str(b): round(
            float(np.mean([r["answer"] for r in records if r["budget"] == b and r["answer"] is not None])), 4
        )
        for b in BUDGETS
    }
    out.update(
        {k: {str(b): round(mean(k, b), 1) for b in BUDGETS} for k in ("tokens", "memories", "excerpts")}
    )
    out["latency_ms"] = {
        str(b): {
            f"p{p}": round(float(np.percentile([r["latency_ms"] for r in records if r["budget"] == b], p)), 2)
            for p in (50, 95)
        }
        for b in BUDGETS
    }
    out["questions"] = len(records) // len(BUDGETS)
    return out


def loco(per_mode: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The mode chosen for each held-out dev conversation on the others (best strict recall averaged
    over the budgets, ties to the mode that cuts less), and the held-out figures of those choices."""
    modes = list(per_mode)  # in the order run: whole, then each family from the least change
    convs = sorted({r["namespace"] for r in per_mode[modes[0]]})

    def score(mode: str, keep: set[str]) -> float:
        return float(np.mean([r["strict"] for r in per_mode[mode] if r["namespace"] in keep]))

    def pick(keep: set[str]) -> str:  # the first of the best (max keeps the first of equals)
        return max(modes, key=lambda m: round(score(m, keep), 4))

    chosen = {c: pick(set(convs) - {c}) for c in convs}
    held = [r for c in convs for r in per_mode[chosen[c]] if r["namespace"] == c]
    return {"chosen_per_conversation": chosen, "chosen_on_all_dev": pick(set(convs)),
            "held_out": {k: summary(held)[k] for k in ("loose", "strict")}}  # fmt: skip


def run(args: Any) -> dict[str, Any]:
    from memstage.cli.eval_commands import _one_thread
    from memstage.tasks.evaluate import load_questions

    original = original_words(args.data)
    modes = {"whole": (0, 0.0, False), **({"repeats": (0, 0.0, True)} if args.repeats else {})}
    modes.update({f"excerpt{w}": (w, 0.0, False) for w in sorted(args.words, reverse=True)})
    modes.update({f"density{d:g}": (0, d, False) for d in sorted(args.density)})
    result: dict[str, Any] = {**study_header("excerpt_packing.py"), "files": {}}
    _one_thread()
    for name in args.files:
        home, path = home_of(args.work, name)
        retriever = retriever_for(home)
        questions = load_questions(path or args.data).items
        per_mode = {}
        for mode, (words, density, repeats) in modes.items():
            retriever.excerpt_words, retriever.density, retriever.drop_repeats = words, density, repeats
            per_mode[mode] = ask(retriever, questions, original)
        got = {mode: summary(r) for mode, r in per_mode.items()}
        if name == "dev" and len(modes) > 1:
            got["loco"] = loco(per_mode)
        result["files"][name] = {"home": str(home), "uptime": uptime(), **got}
        print(name, json.dumps({m: [got[m]["loose"]["1000"], got[m]["strict"]["1000"]] for m in modes}),
              result["files"][name]["uptime"], flush=True)  # fmt: skip
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    result["uptime_end"] = uptime()
    return result


def markdown(result: dict[str, Any]) -> str:
    cols = [(k, b) for k in ("loose", "strict", "answer") for b in BUDGETS]
    lines = [
        f"Packing modes (`{result['command']}`; {result['machine']}; "
        f"start: {result['uptime_start']}; end: {result.get('uptime_end', '-')}).",
        "",
        "Recall per budget with the eval's credit (loose: any memory of the turn packed), strict credit "
        "(the packed text holds half the evidence turn's original content words) and answer credit (a "
        "packed memory of an evidence turn holds half the gold answer's words).",
        "",
        "| file | packing | " + " | ".join(f"{k} @{b}" for k, b in cols)
        + " | memories @1000 | excerpts @1000 | p95 ms @1000 | p95 ms @2000 | load (1/5/15 min) |",
        "|" + " --- |" * (7 + len(cols)),
    ]  # fmt: skip
    for name, per in result["files"].items():
        load = per["uptime"].split("load average:")[-1].strip()
        for mode, r in per.items():
            if not isinstance(r, dict) or "loose" not in r or mode == "loco":
                continue
            lines.append(
                f"| {name} | {mode} | "
                + " | ".join(f"{r[k][str(b)]:.3f}" for k, b in cols)
                + f" | {r['memories']['1000']} | {r['excerpts']['1000']} | {r['latency_ms']['1000']['p95']:.1f}"
                f" | {r['latency_ms']['2000']['p95']:.1f} | {load} |"
            )
        if "loco" in per:
            lines += ["", f"{name} leave-one-conversation-out: " + json.dumps(per["loco"]), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = study_parser(__doc__)
    ap.add_argument("--files", nargs="+", default=list(FILES), choices=FILES)
    ap.add_argument("--words", type=int, nargs="*", default=[40], help="excerpt modes: cut over W words")
    ap.add_argument("--density", type=float, nargs="*", default=[], help="density modes: cost per doubling")
    ap.add_argument(
        "--repeats", action="store_true", help="the mode that leaves out sentences already packed"
    )
    args = ap.parse_args()
    result = run(args)
    write_report(result, args, markdown(result))


if __name__ == "__main__":
    main()
