"""Session-diverse packing (`tasks.diversity`: a ranked memory's score lowered by SESSION_SPREAD for
every better-ranked memory of its session, before packing) against today's packing (score order), on
the dev split and every robustness variant, in one run; beside it, other re-orderings of the ranking
before packing (bench/diversity_forms.py: quota per session, first pass of one row a session, token
shares, MMR by dense similarity).

Parameters are chosen leave-one-conversation-out (LOCO) on the dev split: each conversation's questions
(in dev and in every variant, where it is the same conversation) get the parameter that maximises the
mean recall over the four budgets on dev's other conversations (ties: the milder). The choice replays
the packing: each question's ranked rows, scores, token counts, sessions and duplicate keys are taken
once from `Retriever.ranked`, then packed by `tasks.retrieve.pack_sizes` in each order (the replay of
today's order reproduces the real path's figures: `replay_matches_real`). Then the real path
(`Retriever.retrieve`) answers every question at each budget with today's packing, the LOCO spreads
(unless all are 0: today's packing) and a fixed `--spread`; recall per budget and category, p95.
Also: where today's packing leaves the evidence (sessions packed, the missed turns' rank). Data
directories prepared before (bench/fusion_cv.py, bench/passage_split.py) under --work; none prepared here.

    python bench/session_diversity.py --data ../shared/data/locomo/locomo-dev.json --work /tmp/fusion2 \
        --out bench/results/session_diversity_cpu.json --table bench/results/session_diversity_cpu.md
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import diversity_forms as forms  # noqa: E402
from diversity_forms import BUDGET_DEPENDENT, FORMS  # noqa: E402
from diversity_report import markdown  # noqa: E402
from fusion_cv import BUDGETS, retriever_for, study_parser, write_report  # noqa: E402

from memstage.tasks import diversity  # noqa: E402

# data directory (under --work) and questions file (under --work/variants, dev: --data) per file
HOMES = {
    "dev": "home-dev",
    "speakers": "home-speakers",
    "padded": "home-padded",
    "dated": "home-dated",
    "long": "split-topic/home-long",
    "assistant": "split-topic/home-assistant",
    "ontopic": "split-topic/home-ontopic",
}
BUDGETS_S = tuple(str(b) for b in BUDGETS)


@dataclass
class Replay:
    """One question's ranked level-0 rows, as `Retriever.retrieve` packs them."""

    conversation: str
    category: int
    rows: np.ndarray
    scores: np.ndarray
    sizes: np.ndarray
    groups: np.ndarray  # session code per row
    keys: np.ndarray  # duplicate key per row (equal codes: equal normalised text)
    evidence: list[np.ndarray]  # per evidence turn, the positions of the rows that credit it


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def collect(retriever: Any, questions: list) -> list[Replay]:
    from memstage.tasks.evaluate import own_memories

    out, cache = [], {}
    for q in questions:
        ns = retriever.load(q.namespace)
        if q.namespace not in cache:
            ids = ns.levels[0].column("id").to_pylist()
            texts = [" ".join((t or "").lower().split()) for t in ns.levels[0].column("text").to_pylist()]
            codes = {t: i for i, t in enumerate(dict.fromkeys(texts))}
            owns = own_memories(retriever.store, q.namespace)
            row_of = {m: i for i, m in enumerate(ids)}
            credit = {d: [row_of[m] for m in ms if m in row_of] for d, ms in owns.items()}
            cache[q.namespace] = (np.array([codes[t] for t in texts]), credit)
        keys, credit = cache[q.namespace]
        _, rows, scores = retriever.ranked(ns, q.question, None, q.as_of)
        at = {r: i for i, r in enumerate(rows.tolist())}
        evidence = [np.array([at[r] for r in credit.get(d, ()) if r in at], np.int64) for d in q.evidence]
        sizes = np.asarray(ns.levels[0].tokens)[rows].astype(np.int64)
        groups = np.asarray(ns.session)[rows].astype(np.int64)
        out.append(Replay(q.namespace, q.category, rows, scores, sizes, groups, keys[rows], evidence))
    return out


def packed_recall(r: Replay, order: np.ndarray, budget: int) -> float:
    """Recall at `budget` with the rows packed in `order` (positions of the ranking), as
    `Retriever.retrieve` packs them (`pack_sizes`, duplicates skipped)."""
    from memstage.tasks.retrieve import pack_sizes

    sizes, keys = r.sizes[order], r.keys[order]
    picked, _ = pack_sizes(sizes, budget, lambda j: int(keys[j]))
    packed = np.zeros(len(order), bool)
    packed[order[picked]] = True
    return float(np.mean([packed[e].any() if len(e) else False for e in r.evidence]))


def table(replays: list[Replay], vecs: dict[str, np.ndarray], form: str) -> np.ndarray:
    """Replayed recall per question, parameter of the form's grid and budget."""
    out = np.zeros((len(replays), len(FORMS[form]), len(BUDGETS)))
    for i, r in enumerate(replays):
        for k, p in enumerate(FORMS[form]):
            fixed = None if form in BUDGET_DEPENDENT else forms.order(form, r, vecs, p, 0)
            for b, budget in enumerate(BUDGETS):
                o = fixed if fixed is not None else forms.order(form, r, vecs, p, budget)
                out[i, k, b] = packed_recall(r, o, budget)
    return out


def choose(tab: np.ndarray, replays: list[Replay], train: set[str]) -> int:
    """Index in the grid of the parameter with the best mean recall over the budgets on `train`'s
    questions (the earlier, milder one on ties)."""
    mine = np.array([r.conversation in train for r in replays])
    score = tab[mine].mean(axis=(0, 2))
    return int(np.flatnonzero(score >= score.max() - 1e-12)[0])


def loco(tab_dev: np.ndarray, dev: list[Replay]) -> dict[str, int]:
    """Per held-out conversation, the grid index chosen on dev's other conversations."""
    from memstage.tasks.fusion_fit import loco_folds

    return {held: choose(tab_dev, dev, set(train)) for held, train in loco_folds(r.conversation for r in dev)}


def summary(tab: np.ndarray, replays: list[Replay], pick: dict[str, int]) -> dict[str, Any]:
    """Recall per budget and per category at 1000, each question at its conversation's grid index."""
    from memstage.tasks.evaluate import CATEGORIES

    got = np.array([tab[i, pick[r.conversation]] for i, r in enumerate(replays)])
    cats = np.array([r.category for r in replays])
    at = BUDGETS.index(1000)
    return {
        "recall": {str(b): round(float(got[:, k].mean()), 4) for k, b in enumerate(BUDGETS)},
        "by_category_1000": {
            CATEGORIES[c]: round(float(got[cats == c, at].mean()), 4) for c in sorted(set(cats))
        },
    }


def misses(replays: list[Replay], budget: int = 1000) -> dict[str, Any]:
    """Where today's packing at `budget` leaves evidence: sessions and rows packed per question, and
    per category the missed evidence turns' best rank and whether their session has packed rows."""
    from memstage.tasks.evaluate import CATEGORIES
    from memstage.tasks.retrieve import pack_sizes

    sessions, rows, missed = [], [], {c: [] for c in CATEGORIES}
    for r in replays:
        picked, _ = pack_sizes(r.sizes, budget, lambda j, keys=r.keys: int(keys[j]))
        packed = np.zeros(len(r.sizes), bool)
        packed[picked] = True
        sessions.append(len(set(r.groups[picked].tolist())))
        rows.append(len(picked))
        for e in r.evidence:
            if len(e) and not packed[e].any():
                missed[r.category].append((int(e.min()), bool(np.isin(r.groups[e.min()], r.groups[picked]))))
    return {
        "sessions_packed_mean": round(float(np.mean(sessions)), 2),
        "rows_packed_mean": round(float(np.mean(rows)), 1),
        "missed": {
            CATEGORIES[c]: {
                "turns": len(m),
                "median_rank": float(np.median([x[0] for x in m])) if m else None,
                "in_a_packed_session": round(float(np.mean([x[1] for x in m])), 3) if m else None,
            }
            for c, m in missed.items()
        },
    }


def real(retriever: Any, questions: list, spread_of: dict[str, float]) -> dict[str, Any]:
    """`Retriever.retrieve` over `questions`, each conversation's packed at `spread_of[conversation]`."""
    from memstage.tasks.evaluate import own_memories, run_questions, summarise

    records, kept = [], diversity.SESSION_SPREAD
    for conv in sorted({q.namespace for q in questions}):
        owns = {conv: own_memories(retriever.store, conv)}
        retriever.retrieve(conv, "warm up", 10)
        diversity.SESSION_SPREAD = spread_of[conv]
        try:
            records += run_questions(
                retriever.retrieve, [q for q in questions if q.namespace == conv], owns, BUDGETS
            )
        finally:
            diversity.SESSION_SPREAD = kept
    out = summarise(records)
    return {k: out[k] for k in ("recall", "by_category", "latency_ms", "questions")}


def prepared(args: Any) -> dict[str, Any]:
    """Per file: retriever, questions, replays and level-0 vectors per conversation."""
    from memstage.tasks.evaluate import load_questions

    out = {}
    for name in args.files:
        path = args.data if name == "dev" else args.work / "variants" / f"{name}.json"
        retriever = retriever_for(args.work / HOMES[name])
        questions = load_questions(path).items
        replays = collect(retriever, questions)
        vecs = {}
        for conv in sorted({r.conversation for r in replays}):
            ns = retriever.load(conv)
            vecs[conv] = ns.levels[0].vectors(np.arange(ns.n))
        out[name] = {"retriever": retriever, "questions": questions, "replays": replays, "vecs": vecs}
    return out


def replayed(files: dict[str, Any]) -> dict[str, Any]:
    """Per form: the LOCO choice on dev, the choice on all of dev, and per file the replayed recall of
    today's order, of the LOCO choice, and at 1000 along the grid."""
    dev = files["dev"]["replays"]
    out = {}
    for form, grid in FORMS.items():
        tabs = {name: table(f["replays"], f["vecs"], form) for name, f in files.items()}
        pick = loco(tabs["dev"], dev)
        today = {c: 0 for c in pick}
        per = {}
        for name, f in files.items():
            base, chosen = summary(tabs[name], f["replays"], today), summary(tabs[name], f["replays"], pick)
            per[name] = {
                "today": base,
                "loco": chosen,
                "loco_minus_today": {
                    b: round(chosen["recall"][b] - base["recall"][b], 4) for b in base["recall"]
                },
                "curve_1000": [
                    round(float(v), 4) for v in tabs[name][:, :, BUDGETS.index(1000)].mean(axis=0)
                ],
            }
        dev_diff, dev_cat = per["dev"]["loco_minus_today"], per["dev"]["loco"]["by_category_1000"]
        variants = [p["loco_minus_today"]["1000"] for n, p in per.items() if n != "dev"]
        out[form] = {
            "kept_by_replay": bool(
                min(dev_diff.values()) >= -0.002
                and dev_cat["multi-hop"] > per["dev"]["today"]["by_category_1000"]["multi-hop"]
                and (not variants or np.mean(variants) >= 0)
            ),
            "grid": list(grid),
            "loco_choice": {c: grid[i] for c, i in pick.items()},
            "full_dev_choice": grid[choose(tabs["dev"], dev, {r.conversation for r in dev})],
            "files": per,
        }
        print(form, json.dumps({n: p["loco_minus_today"] for n, p in per.items()}), flush=True)
    return out


def kept(
    real_dev: dict[str, Any], real_today: dict[str, Any], variants: list[dict[str, float]], p95: float
) -> bool:
    """The keep rule: dev within 0.002 of today at every budget, multi-hop up at 1000, the variants'
    mean change at 1000 not negative, p95 under 50 ms."""
    dev_ok = all(real_dev["recall"][b] >= real_today["recall"][b] - 0.002 for b in real_today["recall"])
    mh = real_dev["by_category"]["1000"]["multi-hop"] > real_today["by_category"]["1000"]["multi-hop"]
    return bool(dev_ok and mh and np.mean([v["1000"] for v in variants]) >= 0 and p95 < 50)


def real_runs(
    files: dict[str, Any], loco_spread: dict[str, float], spread: float, out: Any
) -> dict[str, Any]:
    """Per file, the real path with today's packing, the LOCO spreads (when any is not 0) and `spread`."""
    result = {}
    for name, f in files.items():
        convs = sorted({q.namespace for q in f["questions"]})
        per = {"today": real(f["retriever"], f["questions"], {c: 0.0 for c in convs})}
        if any(loco_spread.values()):
            per["loco"] = real(f["retriever"], f["questions"], {c: loco_spread.get(c, 0.0) for c in convs})
        else:  # spread 0 returns the ranking untouched (`tasks.diversity.diverse`): today's packing
            per["loco"] = {"same_as": "today", "why": "every fold chose spread 0"}
        per[f"spread_{spread}"] = real(f["retriever"], f["questions"], {c: spread for c in convs})
        per["uptime"] = uptime()
        result[name] = per
        print(
            name,
            json.dumps({k: v["recall"] for k, v in per.items() if "recall" in v}),
            per["uptime"],
            flush=True,
        )
        out(result)
    return result


def loco_result(per: dict[str, Any]) -> dict[str, Any]:
    return per["today"] if "same_as" in per["loco"] else per["loco"]


def run(args: Any) -> dict[str, Any]:
    from memstage.cli.eval_commands import _one_thread

    result: dict[str, Any] = {
        "command": "python bench/session_diversity.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs (shared with other agents), "
        f"{platform.python_version()}",
        "uptime_start": uptime(),
    }
    _one_thread()
    files = prepared(args)
    result["diagnostics_today_1000"] = {name: misses(f["replays"]) for name, f in files.items()}
    start = time.perf_counter()
    result["replayed"] = replayed(files)
    result["replay_s"] = round(time.perf_counter() - start, 1)
    loco_spread = result["replayed"]["spread"]["loco_choice"]

    def save(real_so_far: dict[str, Any]) -> None:
        result["real"] = real_so_far
        args.out.write_text(json.dumps(result, indent=1) + "\n")

    real_all = real_runs(files, loco_spread, args.spread, save)
    for name, per in real_all.items():
        per["replay_matches_real"] = (
            result["replayed"]["spread"]["files"][name]["today"]["recall"] == per["today"]["recall"]
        )
    dev = real_all["dev"]
    diffs = [
        {b: loco_result(per)["recall"][b] - per["today"]["recall"][b] for b in BUDGETS_S}
        for name, per in real_all.items()
        if name != "dev"
    ]
    p95 = max(
        v["latency_ms"]["1000"]["p95"]
        for per in real_all.values()
        for v in per.values()
        if isinstance(v, dict) and "latency_ms" in v
    )
    result["kept"] = kept(loco_result(dev), dev["today"], diffs, p95)
    result["uptime_end"] = uptime()
    return result


def main() -> None:
    ap = study_parser(__doc__)
    ap.add_argument("--table-only", action="store_true", help="rewrite --table from the JSON at --out")
    ap.add_argument("--files", nargs="+", default=list(HOMES), choices=list(HOMES))
    ap.add_argument("--spread", type=float, default=0.1, help="a fixed spread also run on the real path")
    args = ap.parse_args()
    if args.table_only:
        write_report(json.loads(args.out.read_text()), args, markdown(json.loads(args.out.read_text())))
        return
    if args.files[0] != "dev":
        ap.error("--files must start with dev (the parameters are chosen there)")
    result = run(args)
    print(json.dumps({k: result[k] for k in ("kept", "uptime_start", "uptime_end")}))
    write_report(result, args, markdown(result))


if __name__ == "__main__":
    main()
