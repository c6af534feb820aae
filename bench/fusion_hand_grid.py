"""The hand weights' own leave-one-conversation-out (LOCO) estimate on the dev split, to set beside the
learned fusion's (bench/fusion_cv.py): for each conversation, the hand constants of `tasks.scoring`
(W_DENSE, NEIGHBOUR, SESSION, SPEAKER, PERIOD) are chosen from GRID by recall@1000 on the other four
conversations (the dev file holds five), then that conversation's questions are asked through the
real retrieval and packing path with them. The choice replays the packing over each question's
scored rows (the same rows, scores, token counts, known-at-date rule and duplicate rule as
`Retriever.retrieve`); the reported figures come from the real path. Uses the data directories
bench/fusion_cv.py prepared (`--work`).

    python bench/fusion_hand_grid.py --data ../shared/data/locomo/locomo-dev.json --work /tmp/fusion \
        --out bench/results/fusion_hand_grid_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusion_cv import BUDGETS, prepare, retriever_for  # noqa: E402

GRID = {
    "W_DENSE": (0.5, 0.7, 0.9),
    "NEIGHBOUR": (0.2, 0.4, 0.6),
    "SESSION": (0.25, 0.5, 1.0),
    "SPEAKER": (0.0, 0.4, 1.0),
    "PERIOD": (0.5, 1.0, 2.0),
}
MIN_LEFT = 5


def replay_inputs(retriever: Any, questions: list) -> list[dict[str, Any]]:
    """Per question what the packing needs: the scored rows and their tokens, duplicate keys, whether
    each is known at the question's date, the evidence turns each holds."""
    from memstage.tasks.as_of import as_of_day, known_mask
    from memstage.tasks.fusion_fit import question_rows

    out = []
    for q in questions:
        ns, rows, lq = question_rows(retriever, q.namespace, q.question)
        level = ns.levels[0]
        ev = set(q.evidence)
        texts = level.column("text").take(rows).to_pylist()
        known = known_mask(level.column("event_time"), q.as_of)[rows] if q.as_of else np.ones(len(rows), bool)
        out.append(
            {
                "conv": q.namespace,
                "args": (ns, rows, lq, q.question, as_of_day(q.as_of)),
                "tokens": np.asarray(level.tokens[rows]),
                "keys": [" ".join((t or "").lower().split()) for t in texts],
                "known": np.asarray(known),
                "hits": [set(d or ()) & ev for d in level.column("dia_ids").take(rows).to_pylist()],
                "n_evidence": len(ev),
            }
        )
    return out


def replay_recall(item: dict[str, Any], scores: np.ndarray, budget: int = 1000) -> float:
    """`pack_within_budget` over the rows in `Retriever.ranked`'s order; the evidence share packed."""
    used, seen, got = 0, set(), set()
    for i in np.lexsort((item["args"][1], -scores)).tolist():
        n = int(item["tokens"][i])
        if not item["known"][i] or used + n > budget or item["keys"][i] in seen:
            continue
        used += n
        seen.add(item["keys"][i])
        got |= item["hits"][i]
        if budget - used < MIN_LEFT:
            break
    return len(got) / item["n_evidence"]


def grid_recalls(items: list[dict[str, Any]]) -> tuple[list[dict[str, float]], np.ndarray]:
    """Every GRID point, and the replayed recall@1000 of every question under it (points x questions)."""
    from memstage.tasks import scoring

    points = [dict(zip(GRID, v, strict=True)) for v in itertools.product(*GRID.values())]
    saved = {k: getattr(scoring, k) for k in GRID}
    table = np.zeros((len(points), len(items)))
    try:
        for p, point in enumerate(points):
            for k, v in point.items():
                setattr(scoring, k, v)
            for j, item in enumerate(items):
                table[p, j] = replay_recall(item, scoring.score_rows(*item["args"]))
    finally:
        for k, v in saved.items():
            setattr(scoring, k, v)
    return points, table


def ask_with(retriever: Any, questions: list, constants: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Recall per budget through `Retriever.retrieve`, each conversation's questions asked with its
    own hand constants (`constants[conversation]`)."""
    from memstage.tasks import scoring
    from memstage.tasks.evaluate import own_memories, run_questions, summarise

    records = []
    for conv in sorted({q.namespace for q in questions}):
        saved = {k: getattr(scoring, k) for k in GRID}
        try:
            for k, v in constants[conv].items():
                setattr(scoring, k, v)
            mine = [q for q in questions if q.namespace == conv]
            records += run_questions(
                retriever.retrieve, mine, {conv: own_memories(retriever.store, conv)}, BUDGETS
            )
        finally:
            for k, v in saved.items():
                setattr(scoring, k, v)
    out = summarise(records)
    return {k: out[k] for k in ("recall", "by_category", "latency_ms", "questions")}


def main() -> None:
    from memstage.cli.eval_commands import _one_thread
    from memstage.tasks.evaluate import load_questions
    from memstage.tasks.fusion_fit import loco_folds

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    path, home = prepare(args.data, args.work, ())["dev"]
    _one_thread()
    retriever, questions = retriever_for(home), load_questions(path).items
    start = time.perf_counter()
    items = replay_inputs(retriever, questions)
    points, table = grid_recalls(items)
    convs = np.array([it["conv"] for it in items])
    chosen = {}
    for held, train in loco_folds(convs.tolist()):
        on = np.isin(convs, sorted(train))
        chosen[held] = points[int(np.argmax(table[:, on].mean(axis=1)))]
    best_all = points[int(np.argmax(table.mean(axis=1)))]
    result = {
        "command": "python bench/fusion_hand_grid.py " + " ".join(sys.argv[1:]),
        "uptime_start": uptime,
        "grid": GRID,
        "grid_s": round(time.perf_counter() - start, 1),
        "replayed_recall_1000": {
            "current_constants": round(
                float(table[points.index(dict(zip(GRID, [0.7, 0.4, 0.5, 0.4, 1.0], strict=True)))].mean()), 4
            ),
            "best_on_all_dev_in_sample": round(float(table.mean(axis=1).max()), 4),
        },
        "best_on_all_dev": best_all,
        "chosen_per_fold": chosen,
        "hand_loco": ask_with(retriever, questions, chosen),
        "uptime_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("replayed_recall_1000", "best_on_all_dev")}))
    print("hand re-chosen per fold, LOCO recall:", json.dumps(result["hand_loco"]["recall"]))


if __name__ == "__main__":
    main()
