"""Learned fusion fitted as a deployment would weigh the data: the training samples of the dev split and
every robustness variant pooled, each file given a total weight (not each question), measured
leave-one-conversation-out (LOCO) on every file against the hand weights in the same run.

Per file (dev, then the variants of `tasks/robustness.py`, seed 0), prepared as `bench/fusion_cv.py`
prepares them (under `--work`, reused when present), the questions are asked with:
- `hand`: today's scoring (`tasks.scoring.score_rows`);
- one model per `--mix NAME=FILE:W,...`: for each conversation, `fit_listwise` on the samples of the
  OTHER conversations in every file (a fold drops its held-out conversation's questions from every
  file: `fusion_fit.fold_samples`), each file's questions sharing the file's weight
  (`fusion_fit.file_weights`; a file not named weighs 1).
  Default models: `equal` (every file 1) and `ua` (the user/assistant-shaped files `assistant`,
  `ontopic`, `long` weigh 3, the others 1).
The learned scorer replaces `score_rows` in this process only (`tasks.fusion.scorer`). Keep rule
(issue 15): a model is adopted only if its LOCO recall@1000 is >= hand on every file (within
NOISE) and higher on the weak files (`long`, `assistant`, `ontopic`). Also written: each model's
weights fitted on every conversation (what would be committed). The samples are cached under
`--work` (`samples.pkl`), so a second run with other `--mix` models skips collecting them.

One leak LOCO does not close: `padded`, `long` and `assistant` fill a conversation with text from the
others, so a fold's training files hold the held-out conversation's text as distractor rows (never
its questions or evidence labels); the fitted weights are 7 numbers over query-relative signals.

    python bench/fusion_weighted.py --data ../shared/data/locomo/locomo-dev.json --work /tmp/fusion2 \
        --out bench/results/fusion_weighted_cpu.json --table bench/results/fusion_weighted_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusion_cv import ask, named, prepare, retriever_for, study_parser, write_report  # noqa: E402

BUDGETS = (250, 500, 1000, 2000)
WEAK = ("long", "assistant", "ontopic")
NOISE = 0.002
DEFAULT_MIXES = ("equal=", "ua=assistant:3,ontopic:3,long:3")


def parse_mix(text: str) -> tuple[str, dict[str, float]]:
    """`NAME=FILE:W,FILE:W` -> (NAME, {FILE: W}); `NAME=` weighs every file 1."""
    name, _, spec = text.partition("=")
    if not name.strip():
        raise ValueError(f"mix {text!r} has no name (NAME=FILE:W,...)")
    weights = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        file, _, w = part.partition(":")
        weights[file.strip()] = float(w)
    return name.strip(), weights


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def samples_for(work: Path, files: dict, retrievers: dict, questions: dict) -> dict[str, list]:
    """Each file's `fusion_fit.Sample`s, cached in `work/samples.pkl` (keyed by file names)."""
    from memstage.tasks.fusion_fit import collect

    cache = work / "samples.pkl"
    if cache.exists():
        got = pickle.loads(cache.read_bytes())
        if set(got) == set(files):
            return got
    got = {name: collect(retrievers[name], questions[name], name) for name in files}
    cache.write_bytes(pickle.dumps(got))
    return got


def fit_mix(samples: dict[str, list], per_file: dict[str, float]) -> dict[str, Any]:
    """LOCO weights per held-out conversation, and the weights fitted on every conversation."""
    from memstage.tasks.fusion_fit import file_weights, fit_listwise, fold_samples, loco_folds

    pool = [s for ss in samples.values() for s in ss]
    folds = {}
    for held, train in loco_folds(s.conversation for s in samples["dev"]):
        picked = fold_samples(pool, train, held)
        assert not any(s.conversation == held for s in picked)
        folds[held] = fit_listwise(picked, weights=file_weights(picked, per_file))
    return {"folds": folds, "full": fit_listwise(pool, weights=file_weights(pool, per_file))}


def verdict(files: dict[str, Any], model: str) -> dict[str, Any]:
    """The keep rule for `model` against `hand` at 1000."""
    delta = {n: round(f[model]["recall"]["1000"] - f["hand"]["recall"]["1000"], 4) for n, f in files.items()}
    no_worse = all(d >= -NOISE for d in delta.values())
    weak_up = all(delta[n] > NOISE for n in WEAK if n in delta)
    return {
        "minus_hand_1000": delta,
        "no_worse": no_worse,
        "weak_higher": weak_up,
        "kept": no_worse and weak_up,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from memstage.cli.eval_commands import _one_thread
    from memstage.tasks.evaluate import load_questions
    from memstage.tasks.fusion import hand_weights

    mixes = dict(parse_mix(m) for m in args.mix)
    result: dict[str, Any] = {
        "command": "python bench/fusion_weighted.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs (shared with other agents), "
        f"{platform.python_version()}",
        "uptime_start": uptime(),
        "mixes": mixes,
        "noise": NOISE,
    }
    files = prepare(args.data, args.work, tuple(args.variants))
    _one_thread()
    retrievers = {name: retriever_for(home) for name, (_, home) in files.items()}
    questions = {name: load_questions(path).items for name, (path, _) in files.items()}
    start = time.perf_counter()
    samples = samples_for(args.work, files, retrievers, questions)
    result["samples"] = {n: len(s) for n, s in samples.items()}
    fitted = {m: fit_mix(samples, w) for m, w in mixes.items()}
    result["fit_s"] = round(time.perf_counter() - start, 1)
    result["weights"] = {"hand": named(hand_weights())}
    for m, f in fitted.items():
        result["weights"][m] = {"full": named(f["full"]), **{c: named(w) for c, w in f["folds"].items()}}
    result["files"] = {}
    for name in files:
        per = {"hand": ask(retrievers[name], questions[name], None)}
        for m, f in fitted.items():
            per[m] = ask(retrievers[name], questions[name], f["folds"])
        per["uptime"] = uptime()
        result["files"][name] = per
        print(name, json.dumps({m: per[m]["recall"] for m in ("hand", *fitted)}), per["uptime"], flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    result["verdict"] = {m: verdict(result["files"], m) for m in fitted}
    result["uptime_end"] = uptime()
    return result


def markdown(result: dict[str, Any]) -> str:
    models = ("hand", *result["mixes"])
    lines = [
        f"Learned fusion pooled over dev and every variant, per-file weights, LOCO (`{result['command']}`; "
        f"{result['machine']}; start: {result['uptime_start']}; end: {result.get('uptime_end', '-')}).",
        "",
        "Mixes (file weights; a file not named weighs 1): " + json.dumps(result["mixes"]),
        "",
        "| file | scoring | " + " | ".join(str(b) for b in BUDGETS) + " | p95 ms @1000 | load (1/5/15 min) |",
        "|" + " --- |" * (4 + len(BUDGETS)),
    ]
    for name, per in result["files"].items():
        load = per["uptime"].split("load average:")[-1].strip()
        for m in models:
            r = per[m]
            lines.append(
                f"| {name} | {m} | "
                + " | ".join(f"{r['recall'][str(b)]:.3f}" for b in BUDGETS)
                + f" | {r['latency_ms']['1000']['p95']:.1f} | {load} |"
            )
    lines.append("")
    for m, v in result.get("verdict", {}).items():
        lines.append(
            f"- `{m}`: kept={v['kept']} (no file below hand by more than {result['noise']}: {v['no_worse']}; "
            f"weak files higher: {v['weak_higher']}); minus hand @1000: {json.dumps(v['minus_hand_1000'])}"
        )
    lines.append("")
    for m, w in result["weights"].items():
        lines.append(f"- weights `{m}`: " + json.dumps(w.get("full", w)))
    return "\n".join(lines) + "\n"


def main() -> None:
    from memstage.tasks.robustness import VARIANTS

    ap = study_parser(__doc__)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--mix", nargs="+", default=list(DEFAULT_MIXES), help="NAME=FILE:W,... (see docstring)")
    args = ap.parse_args()
    result = run(args)
    write_report(result, args, markdown(result))


if __name__ == "__main__":
    main()
