"""The LoCoMo evaluation: `memstage eval locomo PATH`, evidence recall within token budgets, with baselines.

Loads the file into a data directory (a fresh temporary one unless `--home`), runs the maintenance
chain in-process (ingest, index, then compress -> consolidate -> update -> index -> forget), and asks
every category 1-4 question with evidence at each budget. The measure itself lives in
`tasks/evaluate.py`; this module wires the store, the models and the report (table, JSON, plot).
`--variants` evaluates the robustness variants of the file too (`cli/eval_variants.py`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from memstage.settings import get_settings
from memstage.tasks.evaluate import (
    CATEGORIES,
    DEFAULT_BUDGETS,
    RawTurnBaselines,
    load_questions,
    own_memories,
    run_questions,
    summarise,
)


def prepare_store(
    path: Path, home: Path, *, maintain: bool = True, models: Path | None = None
) -> dict[str, Any]:
    """Ingest and index `path` into `home`, then run the maintenance chain; returns what each step did."""
    from memstage.gpu.tokenizer import TokenCounter
    from memstage.stores.store import MemoryStore
    from memstage.tasks.index import run_index
    from memstage.tasks.ingest import commit_events, parse_file

    store = MemoryStore(home)
    counter = TokenCounter(models or store.models_dir())
    steps: dict[str, Any] = {}
    start = time.perf_counter()
    steps["ingest"] = commit_events(store, *parse_file(path, "locomo")).figures
    encoder = _encoder()
    for ns in store.namespaces():
        run_index(store, ns, embed=encoder.encode, count_tokens=counter.count_many)
    if maintain:
        steps["maintain"] = _maintain(home)
    steps["prepare_s"] = round(time.perf_counter() - start, 1)
    return steps


def _encoder() -> Any:
    from memstage.gpu.encoder import Encoder

    global _ENCODER
    if _ENCODER is None:
        _ENCODER = Encoder()
    return _ENCODER


_ENCODER = None


def _one_thread() -> None:
    """Questions are encoded one at a time: torch's intra-op threads only add contention there (on the
    2 shared cores here, 2 threads made a question's encoding 10x slower than 1)."""
    import torch

    torch.set_num_threads(1)


def _maintain(home: Path) -> dict[str, Any]:
    """The stage chain, in-process (no Ray: one machine, one writer)."""
    from memstage.flows.stages import run_maintain
    from memstage.runtime.backends import RuntimeConfig

    report = run_maintain(None, RuntimeConfig(home=home, runner="local"))
    return {s: {"status": r["status"], "changed": r.get("changed")} for s, r in report["stages"].items()}


def evaluate_locomo(
    path: Path,
    *,
    budgets: tuple[int, ...] = DEFAULT_BUDGETS,
    baselines: bool = False,
    home: Path | None = None,
    maintain: bool = True,
    plot: Path | None = None,
    exhaustive: bool = True,
    answers: bool = False,
    answer_limit: int | None = None,
    engine: str | None = None,
    answer_budgets: tuple[int, ...] = (),
) -> dict[str, Any]:
    """The whole evaluation; returns the report (memstage's figures at the top, baselines under `baselines`,
    answer F1 under `answers` when asked)."""
    from memstage.cli.eval_answers import eval_answers
    from memstage.stores.store import MemoryStore
    from memstage.tasks.retrieve import Retriever

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    questions = load_questions(path)
    tmp = None
    if home is None:
        tmp = tempfile.TemporaryDirectory(prefix="memstage-eval-")
        home = Path(tmp.name)
    try:
        models = get_settings().models
        steps = prepare_store(path, home, maintain=maintain, models=models)
        store = MemoryStore(home)
        encoder = _encoder()
        from memstage.gpu.tokenizer import TokenCounter

        counter = TokenCounter(models or store.models_dir())
        namespaces = sorted({q.namespace for q in questions.items})
        owns = {ns: own_memories(store, ns) for ns in namespaces}
        retriever = Retriever(store, encoder, counter)
        _one_thread()
        for ns in namespaces:  # warm: loading a namespace is not a question's latency
            retriever.retrieve(ns, "warm up", 10)
        report = summarise(run_questions(retriever.retrieve, questions.items, owns, budgets))
        if exhaustive:
            report["exhaustive"] = exhaustive_reference(
                store, encoder, counter, questions.items, owns, budgets, report
            )
        report.update(
            {
                "questions_dated": sum(q.as_of is not None for q in questions.items),
                "question_dates_unreadable": questions.unreadable_dates,
                "evidence_dropped": len(questions.dropped_ids),
                "evidence_dropped_ids": questions.dropped_ids,
                "questions_without_evidence": questions.without_evidence,
                "conversations": len(namespaces),
                "steps": steps,
            }
        )
        if baselines:
            base = RawTurnBaselines(store, encoder, counter.count_many)
            base_owns = {ns: base.owns(ns) for ns in namespaces}
            report["baselines"] = {
                method: summarise(run_questions(base.retriever(method), questions.items, base_owns, budgets))
                for method in RawTurnBaselines.METHODS
            }
        if answers:
            report["answers"] = eval_answers(
                store, retriever, counter, questions.items, answer_limit, engine, answer_budgets
            )
        if plot is not None:
            report["plot"] = str(write_plot(report, plot))
        return report
    finally:
        if tmp is not None:
            tmp.cleanup()


def exhaustive_reference(
    store: Any, encoder: Any, counter: Any, items: list, owns: dict, budgets: tuple[int, ...], report: dict
) -> dict[str, Any]:
    """The same questions through an exhaustive scan with the same scoring (every level-0 memory
    scored), in the same run: the index path's recall minus this one's, per budget."""
    from memstage.tasks.retrieve import Retriever

    scan = Retriever(store, encoder, counter, exhaustive=True)
    ref = summarise(run_questions(scan.retrieve, items, owns, budgets))
    return {
        "recall": ref["recall"],
        "index_minus_exhaustive": {b: round(report["recall"][b] - r, 4) for b, r in ref["recall"].items()},
        "latency_ms": ref["latency_ms"],
    }


def write_plot(report: dict[str, Any], path: Path) -> Path:
    """Recall against budget, memstage and the baselines, and per category beside it, as a PNG."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, cat_ax) = plt.subplots(1, 2, figsize=(11, 4), dpi=120, gridspec_kw={"width_ratios": [6, 5]})
    plot_categories(cat_ax, report)
    series = {"memstage": report, **{f"{m} (raw turns)": r for m, r in report.get("baselines", {}).items()}}
    for name, r in series.items():
        xs = sorted(int(b) for b in r["recall"])
        ax.plot(
            xs,
            [r["recall"][str(b)] for b in xs],
            marker="o",
            label=name,
            linewidth=2.5 if name == "memstage" else 1.2,
        )
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("token budget (generator tokenizer)")
    ax.set_ylabel("evidence recall")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"LoCoMo evidence recall ({report['questions']} questions)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_categories(ax: Any, report: dict[str, Any]) -> None:
    """Grouped bars: recall per category at the budget nearest 1000, memstage and each baseline."""
    budget = min(report["by_category"], key=lambda b: abs(int(b) - 1000))
    series = {"memstage": report, **report.get("baselines", {})}
    cats = [c for c in CATEGORIES.values() if c in report["by_category"][budget]]
    width = 0.8 / len(series)
    for i, (name, r) in enumerate(series.items()):
        values = [r["by_category"][budget].get(c, 0.0) for c in cats]
        ax.bar([k + i * width for k in range(len(cats))], values, width, label=name)
    ax.set_xticks([k + width * (len(series) - 1) / 2 for k in range(len(cats))], cats, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"evidence recall at {budget} tokens")
    ax.set_title("per category")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="lower right")


# ---- the command --------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    from memstage.cli.main import add_common

    p = sub.add_parser("eval", help="evaluate retrieval quality on a benchmark")
    bench = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    q = bench.add_parser("locomo", help="LoCoMo evidence recall within token budgets (categories 1-4)")
    q.add_argument("path", type=Path, help="a LoCoMo-format .json file")
    q.add_argument(
        "--budget",
        type=int,
        nargs="+",
        default=list(DEFAULT_BUDGETS),
        help="token budgets (default 250 500 1000 2000)",
    )
    q.add_argument(
        "--baselines", action="store_true", help="also dense, BM25 and their fusion over raw turns"
    )
    q.add_argument("--no-maintain", action="store_true", help="ingest and index only; skip the stage chain")
    q.add_argument("--plot", type=Path, default=None, help="write recall against budget to this PNG")
    q.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="VARIANT",
        help="also evaluate robustness variants generated from PATH: all, or some of "
        "speakers padded dated long assistant (see tasks/robustness.py)",
    )
    q.add_argument("--seed", type=int, default=0, help="--variants: the generator's seed (default 0)")
    q.add_argument(
        "--answers",
        action="store_true",
        help="also answer the questions with the generator: LoCoMo token F1 beside an extractive baseline",
    )
    q.add_argument(
        "--limit", type=int, default=None, help="--answers: at most N questions, spread evenly (CPU time)"
    )
    q.add_argument(
        "--engine", default=None, choices=("transformers", "openai", "vllm"), help="--answers' generator"
    )
    q.add_argument(
        "--answer-budget",
        type=int,
        nargs="+",
        default=None,
        metavar="TOKENS",
        help="--answers: tokens of the best memories the generator reads, one run per value in this run "
        "(default: $MEMSTAGE_ANSWER_BUDGET, else the built-in default)",
    )
    add_common(q)
    q.set_defaults(run=cmd_eval_locomo, render=render_eval)


def cmd_eval_locomo(args: argparse.Namespace) -> dict[str, Any]:
    from memstage.cli.main import UserError

    if any(b <= 0 for b in args.budget):
        raise UserError("every --budget must be a positive number of tokens")
    if any(b <= 0 for b in args.answer_budget or ()):
        raise UserError("every --answer-budget must be a positive number of tokens")
    from memstage.cli.eval_variants import evaluate_variants, resolve_variants

    try:
        variants = resolve_variants(args.variants)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    home = args.home.expanduser().resolve() if args.home else None
    options = {
        "budgets": tuple(sorted(set(args.budget))),
        "baselines": args.baselines,
        "home": home,
        "maintain": not args.no_maintain,
        "plot": args.plot,
        "answers": args.answers,
        "answer_limit": args.limit,
        "engine": args.engine,
        "answer_budgets": tuple(args.answer_budget or ()),
    }
    if variants:
        return evaluate_variants(args.path, variants, evaluate_locomo, seed=args.seed, **options)
    return evaluate_locomo(args.path, **options)


def render_eval(r: dict[str, Any]) -> str:
    from memstage.cli.eval_answers import answer_table
    from memstage.cli.eval_variants import render_variants

    lines = [
        f"LoCoMo evidence recall: {r['questions']} questions (categories 1-4 with evidence) in "
        f"{r['conversations']} conversations; {r['evidence_dropped']} malformed evidence ids dropped "
        f"({', '.join(r['evidence_dropped_ids']) or 'none'}), {r['questions_without_evidence']} questions without evidence"
        + (f"; {r['questions_dated']} asked on a question_date" if r.get("questions_dated") else ""),
        "",
        *recall_table(r),
        *render_variants(r, recall_table),
        *answer_table(r),
    ]
    if r.get("plot"):
        lines.append(f"plot: {r['plot']}")
    return "\n".join(lines)


def recall_table(r: dict[str, Any]) -> list[str]:
    """memstage and each baseline: recall per budget, and per category beneath."""
    budgets = list(r["recall"])
    cats = list(CATEGORIES.values())
    head = f"{'':22s}" + "".join(f"{b:>8s}" for b in budgets)
    lines = [
        head,
        "memstage".ljust(22) + "".join(f"{r['recall'][b]:8.3f}" for b in budgets),
    ]
    for c in cats:
        if c in r["by_category"][budgets[0]]:
            lines.append(f"  {c}".ljust(22) + "".join(f"{r['by_category'][b][c]:8.3f}" for b in budgets))
    lines.append("  mean tokens used".ljust(22) + "".join(f"{r['tokens'][b]:8.0f}" for b in budgets))
    lines.append("  latency p50 ms".ljust(22) + "".join(f"{r['latency_ms'][b]['p50']:8.1f}" for b in budgets))
    lines.append("  latency p95 ms".ljust(22) + "".join(f"{r['latency_ms'][b]['p95']:8.1f}" for b in budgets))
    if "exhaustive" in r:
        ex = r["exhaustive"]["recall"]
        lines.append("exhaustive scan".ljust(22) + "".join(f"{ex[b]:8.3f}" for b in budgets))
    for method, base in r.get("baselines", {}).items():
        lines.append(
            f"{method} (raw turns)".ljust(22) + "".join(f"{base['recall'][b]:8.3f}" for b in budgets)
        )
        for c in cats:
            if c in base["by_category"][budgets[0]]:
                lines.append(
                    f"  {c}".ljust(22) + "".join(f"{base['by_category'][b][c]:8.3f}" for b in budgets)
                )
    return lines
