"""`memstage eval locomo --answers`: LoCoMo answer F1 of the generator beside the extractive baseline.

The generator answers a spread of the questions from the evidence retrieved at the default budget,
once per answer budget (tokens of the best memories it reads) in the same run, with the prompt sizes,
answer times and looping answers of each; the extractive baseline (best sentence of the top memory)
does not depend on the answer budget. The measure lives in `tasks/answer_eval.py`.
"""

from __future__ import annotations

import time
from typing import Any

from memstage.settings import get_settings


def eval_answers(
    store: Any,
    retriever: Any,
    counter: Any,
    questions: list,
    limit: int | None,
    engine: str | None,
    answer_budgets: tuple[int, ...] = (),
) -> dict[str, Any]:
    """LoCoMo answer F1 of the configured generator and of the extractive baseline, at the default
    retrieval budget, for each answer budget (tokens of memories the generator reads) in the same run:
    the figures of the configured one (MEMSTAGE_ANSWER_BUDGET) at the top, every one under
    `by_answer_budget`."""
    from memstage.gpu.generator import make_generator
    from memstage.tasks.answer_eval import spread
    from memstage.tasks.forget import load_policy
    from memstage.tasks.generate import STANDING_BUDGET, standing_block

    generator = make_generator(engine, get_settings().models or store.models_dir(), get_settings().device)
    chosen = spread(questions, limit)
    policy = {ns: load_policy(store, ns)["flagged"] for ns in {q.namespace for q in chosen}}
    standing = {
        ns: standing_block(store.memories(ns), STANDING_BUDGET, counter.count, flagged=policy[ns])
        for ns in policy
    }
    default = get_settings().answer_budget
    budgets = tuple(dict.fromkeys(answer_budgets or (default,)))
    runs = {b: _answers_at(generator, retriever, chosen, standing, policy, b) for b in budgets}
    out = dict(runs[default if default in runs else budgets[0]])
    out.update(
        {
            "engine": getattr(generator, "name", ""),
            "of_questions": len(questions),
            "by_answer_budget": {
                str(b): {k: r[k] for k in ("f1", "extractive_f1", "by_category", "generation", "seconds")}
                for b, r in runs.items()
            },
        }
    )
    return out


def _answers_at(
    generator: Any, retriever: Any, chosen: list, standing: dict, policy: dict, answer_budget: int
) -> dict[str, Any]:
    """`evaluate_answers` with the generator reading `answer_budget` tokens of memories, with its
    prompt sizes, answer times and looping answers beside the F1."""
    import numpy as np

    from memstage.tasks.answer_eval import evaluate_answers
    from memstage.tasks.generate import answer_question, repeats
    from memstage.tasks.retrieve import DEFAULT_BUDGET

    usages, loops = [], 0
    start = time.perf_counter()

    def answer(retrieval: dict[str, Any]) -> dict[str, Any]:
        nonlocal loops
        ns = retrieval["namespace"]
        out = answer_question(
            generator, retrieval, standing=standing[ns], flagged=policy[ns], answer_budget=answer_budget
        )
        usages.append(out.get("usage") or {})
        loops += repeats(str(out.get("answer") or ""))
        return out

    out = evaluate_answers(chosen, retriever.retrieve, answer, DEFAULT_BUDGET)

    def p50(key: str) -> float:
        return round(float(np.percentile([u.get(key) or 0 for u in usages], 50)), 1) if usages else 0.0

    out["answer_budget"] = answer_budget
    out["generation"] = {
        "prompt_tokens_p50": p50("prompt_tokens"),
        "cached_tokens_p50": p50("cached_tokens"),
        "completion_tokens_p50": p50("completion_tokens"),
        "answer_ms_p50": p50("total_ms"),
        "answers_repeating_a_phrase_3_times": loops,
    }
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def answer_table(r: dict[str, Any]) -> list[str]:
    """The answer F1 table of `--answers`: the generator beside the extractive baseline, by category."""
    a = r.get("answers")
    if not a:
        return []
    lines = [
        "",
        f"answer F1 at budget {a['budget']}, answer budget {a.get('answer_budget')} "
        f"({a['questions']} of {a['of_questions']} questions, {a['engine']}):",
        f"{'':22s}{'generator':>10s}{'extractive':>11s}",
        "all".ljust(22) + f"{a['f1']:10.3f}{a['extractive_f1']:11.3f}",
    ]
    for c, v in a["by_category"].items():
        lines.append(f"  {c} ({v['questions']})".ljust(22) + f"{v['f1']:10.3f}{v['extractive_f1']:11.3f}")
    for b, v in (a.get("by_answer_budget") or {}).items():
        g = v["generation"]
        lines.append(
            f"answer budget {b}".ljust(22) + f"{v['f1']:10.3f}{v['extractive_f1']:11.3f}"
            f"  (prompt p50 {g['prompt_tokens_p50']:.0f} tokens, answer p50 {g['answer_ms_p50']:.0f} ms)"
        )
    return lines
