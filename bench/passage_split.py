"""Long turns cut where their topic changes (`passages.SPLIT_MODE = "topic"`, `tasks.topic_split`,
the default since this bench) against fixed windows of WINDOW_WORDS words (the default before) and
fixed windows of about the topic passages' mean size (so a gain from smaller passages is not read as
a gain from topic cuts), on the robustness files that hold long turns, with today's hand scoring.

Only a turn of more than SPLIT_WORDS words is split, and no turn of the dev split, `speakers`,
`padded` or `dated` has that many (checked here: `long_turns` per file), so those files score the
same under every configuration; each configuration re-prepares `long`, `assistant` and `ontopic`
(ingest, index, the maintenance chain, in this process, so the module constants set here apply)
under `--work/split-<config>/`. (The run in passage_split_cpu.json, made before "topic" became the
default, took `fixed` from `--work/home-<file>`, prepared by bench/fusion_weighted.py with the fixed
windows of the time; each entry names its `home`.) Reported per file and configuration: recall at
each budget (credit per turn, as `memstage eval`), recall with strict credit
(bench/robustness.strict_long: the packed memory of the turn must hold half the turn's original
words, so a packed passage of filler earns nothing), the active passages and their mean words, p95.

    python bench/passage_split.py --data ../shared/data/locomo/locomo-dev.json --work /tmp/fusion2 \
        --control-width 45 --control-files long \
        --out bench/results/passage_split_cpu.json --table bench/results/passage_split_cpu.md
    # the same-size control on the other two files, and the runs without near-duplicate merging:
    python bench/passage_split.py ... --configs fixed45 --control-width 45 \
        --control-files assistant ontopic --out bench/results/passage_split_control_cpu.json ...
    python bench/passage_split.py ... --no-merge --files long --configs fixed topic \
        --out bench/results/passage_split_nomerge_cpu.json ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusion_cv import BUDGETS, ask, retriever_for, study_parser, write_report  # noqa: E402
from robustness import strict_long  # noqa: E402

from memstage.tasks import passages  # noqa: E402

FILES = ("long", "assistant", "ontopic")
TODAY = (passages.SPLIT_MODE, passages.WINDOW_WORDS)  # restored after each preparation


def long_turns(path: Path) -> int:
    """Turns of the file with more than SPLIT_WORDS words (the ones any configuration splits)."""
    from memstage.tasks.robustness import load_samples, sessions

    return sum(
        len(str(t.get("text", "")).split()) > passages.SPLIT_WORDS
        for s in load_samples(path)
        for n in sessions(s["conversation"])
        for t in s["conversation"][f"session_{n}"]
        if isinstance(t, dict)
    )


def passage_stats(home: Path) -> dict[str, Any]:
    """Passages in the prepared store (level-0 memories with `metadata.passage`) and their mean words."""
    from memstage.stores.store import MemoryStore

    store = MemoryStore(home)
    sizes = []
    for ns in store.namespaces():
        for m in store.memories(ns, level=0, status="active", current=False).to_pylist():
            p = passages.passage_source(m["metadata"])
            if p is not None:
                sizes.append(len(p["source"].split()))
    mean = round(sum(sizes) / len(sizes), 1) if sizes else 0.0
    return {"passages": len(sizes), "mean_words": mean}


def configure(mode: str, width: int) -> None:
    passages.SPLIT_MODE, passages.WINDOW_WORDS = mode, width


def home_for(args: argparse.Namespace, config: str, name: str, path: Path) -> Path:
    """The prepared data directory of `config` on file `name` (prepared now when missing). With
    `args.no_merge` the consolidate stage merges no near-duplicates (its threshold set above any
    cosine): the variants reuse filler text, so passages that repeat each other are merged, fewer
    distractors are left, and the survivor credits every turn it merged; this shows how much of a
    configuration's figure comes from that."""
    from memstage.cli.eval_commands import prepare_store
    from memstage.tasks import consolidate

    no_merge = getattr(args, "no_merge", False)
    home = args.work / f"split-{config}{'-nomerge' if no_merge else ''}" / f"home-{name}"
    if not (home / "prepared.json").exists():
        defaults = dict(consolidate.run_consolidate.__kwdefaults__)
        if no_merge:
            consolidate.run_consolidate.__kwdefaults__["dup_threshold"] = 2.0
        try:
            steps = prepare_store(path, home)
        finally:
            consolidate.run_consolidate.__kwdefaults__.update(defaults)
        (home / "prepared.json").write_text(json.dumps({"path": str(path), "steps": steps}))
    return home


def uptime() -> str:
    import subprocess

    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from memstage.cli.eval_commands import _one_thread
    from memstage.tasks.evaluate import load_questions
    from memstage.tasks.robustness import write_variants

    configs = {"fixed": ("fixed", TODAY[1]), "topic": ("topic", TODAY[1]),
               f"fixed{args.control_width}": ("fixed", args.control_width)}  # fmt: skip
    files_of = {c: tuple(args.files) for c in configs}
    files_of[f"fixed{args.control_width}"] = tuple(args.control_files)
    if args.configs:  # a run of some configurations only (recall is deterministic; latency is per run)
        configs = {c: v for c, v in configs.items() if c in args.configs}
    result: dict[str, Any] = {
        "command": "python bench/passage_split.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs (shared with other agents), "
        f"{platform.python_version()}",
        "uptime_start": uptime(),
        "configs": {c: {"mode": m, "window_words": w, "files": files_of[c]} for c, (m, w) in configs.items()},
        "split_words": passages.SPLIT_WORDS,
    }
    paths = write_variants(args.data, args.work / "variants", ("speakers", "padded", "dated", *FILES), 0)
    result["long_turns"] = {"dev": long_turns(args.data), **{n: long_turns(p) for n, p in paths.items()}}
    result["files"] = {name: {} for name in args.files}
    result["no_merge"] = args.no_merge
    for config, (mode, width) in configs.items():
        for name in files_of[config]:
            configure(mode, width)
            try:
                home = home_for(args, config, name, paths[name])
            finally:
                configure(*TODAY)
            _one_thread()
            retriever = retriever_for(home)
            got = ask(retriever, load_questions(paths[name]).items, None)
            got["strict_recall"] = strict_long(home, paths[name], args.data, BUDGETS)
            got.update(passage_stats(home), home=str(home), uptime=uptime())
            result["files"][name][config] = got
            print(name, config, json.dumps(got["recall"]), json.dumps(got["strict_recall"]), got["uptime"],
                  flush=True)  # fmt: skip
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    result["uptime_end"] = uptime()
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Long turns split by topic against fixed windows (`{result['command']}`; {result['machine']}; "
        f"start: {result['uptime_start']}; end: {result.get('uptime_end', '-')}).",
        "",
        f"Turns over {result['split_words']} words per file: " + json.dumps(result["long_turns"]),
        "",
        "| file | split | passages | mean words | "
        + " | ".join(f"@{b}" for b in BUDGETS)
        + " | strict "
        + " | strict ".join(f"@{b}" for b in BUDGETS)
        + " | p95 ms @1000 | load (1/5/15 min) |",
        "|" + " --- |" * (6 + 2 * len(BUDGETS)),
    ]
    for name, per in result["files"].items():
        for config, r in per.items():
            load = r["uptime"].split("load average:")[-1].strip()
            lines.append(
                f"| {name} | {config} | {r['passages']} | {r['mean_words']} | "
                + " | ".join(f"{r['recall'][str(b)]:.3f}" for b in BUDGETS)
                + " | "
                + " | ".join(f"{r['strict_recall'][str(b)]:.3f}" for b in BUDGETS)
                + f" | {r['latency_ms']['1000']['p95']:.1f} | {load} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = study_parser(__doc__)
    ap.add_argument("--control-width", type=int, default=30, help="fixed windows of about the topic mean")
    ap.add_argument("--configs", nargs="+", default=None, help="run only these (fixed, topic, fixedW)")
    ap.add_argument("--files", nargs="+", default=list(FILES), choices=FILES)
    ap.add_argument("--no-merge", action="store_true", help="consolidate merges no near-duplicates")
    ap.add_argument("--control-files", nargs="+", default=list(FILES), choices=FILES)
    args = ap.parse_args()
    result = run(args)
    write_report(result, args, markdown(result))


if __name__ == "__main__":
    main()
