"""How far a reranker could take recall@1000 on this CPU: a perfect reranker's bound per depth, and what
scoring that many candidates with a cross-encoder of MiniLM's size costs here, in one run.

Per file (the dev split and the robustness variants, on the stores bench/fusion_cv.py and
bench/passage_split.py prepared under --work; nothing is prepared here), every question is ranked by
today's retrieval (`Retriever.ranked`) and packed at 1000 tokens by today's packing
(`tasks.packing.pack_ranked`, the sentences already packed left out), with the eval's credit (a turn
counts when one of its level-0 memories is packed):
- `perfect@D`: the rows of the question's evidence among the ranking's first D moved to its front,
  the rest in order: what a reranker that scores the first D candidates perfectly would pack. D = 0
  is today's figure (it reproduces `memstage eval`'s recall@1000).
- `missed`: for each evidence turn today's packing misses, its best row's rank by the dense score
  alone and by BM25 alone over all level-0 rows: the share below rank 30 and below rank 100 in both
  (no signal retrieval has puts it near the top).
Then the cost: a cross-encoder reads the question and each candidate together, one transformer
sequence each. With no cross-encoder's weights on this machine (none ships as an installable
package; the Hugging Face hub is not reachable), the cost is measured with the packaged MiniLM-L6
encoder, which has the size of the common ms-marco-MiniLM-L-6 cross-encoders (6 layers, 384 wide),
over the same sequences: question + candidate text for the first D candidates of real questions,
D in --depths, median of --repeats runs over --latency-questions dev questions, torch at 2 threads.

    python bench/rerank_bound.py --data ../shared/data/locomo/locomo-dev.json --work /tmp/fusion2 \\
        --out bench/results/rerank_bound_cpu.json --table bench/results/rerank_bound_cpu.md
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from excerpt_packing import FILES, home_of  # noqa: E402
from fusion_cv import retriever_for, study_header, study_parser, write_report  # noqa: E402
from passage_split import uptime  # noqa: E402

BUDGET = 1000
DEPTHS = (0, 5, 10, 30, 100, 300)


def question_figures(r: Any, ns: Any, q: Any, credit: dict[str, list[int]], signals: Any) -> dict[str, Any]:
    """One question's recall with a perfect reranker per depth, and its missed turns' signal ranks."""
    from memstage.tasks.packing import pack_ranked
    from memstage.tasks.retrieve import search_text

    qvec = r.encoder.encode([search_text(ns, q.question)])[0]  # once, for the ranking and the signals
    _, rows, _ = r.ranked(ns, q.question, None, q.as_of, qvec)
    text = ns.levels[0].column("text")
    sizes = np.asarray(ns.levels[0].tokens)[rows].astype(np.int64)
    at = {int(x): i for i, x in enumerate(rows.tolist())}
    evidence = [[at[x] for x in credit.get(d, ()) if x in at] for d in q.evidence]
    out: dict[str, Any] = {"perfect": {}}
    for depth in DEPTHS:
        front = np.array(sorted({p for ps in evidence for p in ps if p < depth}), np.int64)
        rest = np.ones(len(rows), bool)
        rest[front] = False
        order = np.concatenate([front, np.flatnonzero(rest)])
        picked, _, _ = pack_ranked(
            lambda j, o=order: text[int(rows[o[j]])].as_py() or "", sizes[order].copy(), BUDGET,
            counter=r.token_counter,
        )  # fmt: skip
        packed = set(order[picked].tolist())
        out["perfect"][depth] = float(np.mean([bool(packed & set(ps)) for ps in evidence]))
        if depth == 0:
            missed = [d for d, ps in zip(q.evidence, evidence, strict=True) if not packed & set(ps)]
    dense_rank, bm25_rank = signals(ns, q.question, qvec)
    out["missed"] = [
        (int(dense_rank[credit[d]].min()), int(bm25_rank[credit[d]].min())) for d in missed if credit.get(d)
    ]
    return out


def signal_ranks(r: Any) -> Any:
    """(ns, question, its embedding) -> each level-0 row's rank by the dense score alone and by BM25
    alone."""
    from memstage.gpu.lexical_index import analyse
    from memstage.tasks.retrieve import search_text

    vectors: dict[int, np.ndarray] = {}

    def ranks(ns: Any, question: str, qvec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        level = ns.levels[0]
        n = len(level.tokens)
        if id(ns) not in vectors:
            vectors[id(ns)] = np.asarray(level.vectors(np.arange(n)), np.float32)
        said = search_text(ns, question)
        dense = vectors[id(ns)] @ np.asarray(qvec, np.float32)
        rows, vals, _, _ = level.lexical.sparse_scores(analyse([said])[0])
        lex = np.zeros(n)
        lex[rows] = vals
        out = []
        for score in (dense, lex):
            rank = np.empty(n, np.int64)
            rank[np.argsort(-score, kind="stable")] = np.arange(n)
            out.append(rank)
        out[1][lex <= 0] = n  # no word in common: no BM25 rank
        return out[0], out[1]

    return ranks


def file_figures(name: str, args: Any) -> dict[str, Any]:
    from memstage.tasks.evaluate import load_questions, own_memories

    home, path = home_of(args.work, name)
    r = retriever_for(home)
    questions = [q for q in load_questions(path or args.data).items if q.evidence]
    signals, credits, per = signal_ranks(r), {}, []
    for q in questions:
        ns = r.load(q.namespace)
        if q.namespace not in credits:
            row_of = {m: i for i, m in enumerate(ns.levels[0].column("id").to_pylist())}
            owns = own_memories(r.store, q.namespace)
            credits[q.namespace] = {d: [row_of[m] for m in ms if m in row_of] for d, ms in owns.items()}
        per.append(question_figures(r, ns, q, credits[q.namespace], signals))
    missed = [m for p in per for m in p["missed"]]
    return {
        "questions": len(per),
        "perfect": {str(d): round(float(np.mean([p["perfect"][d] for p in per])), 4) for d in DEPTHS},
        "missed_turns": len(missed),
        "missed_below_30_in_both": round(float(np.mean([min(m) >= 30 for m in missed])), 3),
        "missed_below_100_in_both": round(float(np.mean([min(m) >= 100 for m in missed])), 3),
        "missed_median_dense_rank": float(np.median([m[0] for m in missed])),
        "missed_median_bm25_rank": float(np.median([m[1] for m in missed])),
        "uptime": uptime(),
    }


def rerank_cost(args: Any) -> dict[str, Any]:
    """Median ms to run the MiniLM-L6 encoder over (question + candidate) for the first D candidates."""
    import torch

    from memstage.tasks.evaluate import load_questions

    torch.set_num_threads(2)
    r = retriever_for(home_of(args.work, "dev")[0])
    every = load_questions(args.data).items
    questions = every[:: max(1, len(every) // args.latency_questions)][: args.latency_questions]
    out = {}
    for depth in args.depths:
        times = []
        for q in questions:
            ns = r.load(q.namespace)
            _, rows, _ = r.ranked(ns, q.question, None, q.as_of)
            text = ns.levels[0].column("text")
            pairs = [f"{q.question} {text[int(x)].as_py()}" for x in rows[:depth].tolist()]
            r.encoder.encode(pairs[:2])
            for _ in range(args.repeats):
                start = time.perf_counter()
                r.encoder.encode(pairs)
                times.append((time.perf_counter() - start) * 1000)
        out[str(depth)] = round(float(np.median(times)), 1)
    return {"median_ms_per_depth": out, "torch_threads": torch.get_num_threads(), "uptime": uptime()}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Reranker bound (`{result['command']}`; {result['machine']}; start: {result['uptime_start']}; "
        f"end: {result['uptime_end']}).",
        "",
        "Recall@1000 (eval's credit) with a perfect reranker of the ranking's first D candidates "
        "(D = 0: today), and where the evidence today's packing misses sits by the dense score alone and "
        "BM25 alone:",
        "",
        "| file | " + " | ".join(f"D={d}" for d in DEPTHS) + " | missed turns | below 30th in both | "
        "below 100th in both | median dense rank | median BM25 rank |",
        "|" + " --- |" * (len(DEPTHS) + 6),
    ]
    for name, f in result["files"].items():
        lines.append(
            f"| {name} | " + " | ".join(f"{f['perfect'][str(d)]:.3f}" for d in DEPTHS)
            + f" | {f['missed_turns']} | {f['missed_below_30_in_both']:.3f} | {f['missed_below_100_in_both']:.3f}"
            f" | {f['missed_median_dense_rank']:.0f} | {f['missed_median_bm25_rank']:.0f} |"
        )  # fmt: skip
    cost = result["rerank_cost"]
    lines += [
        "",
        f"Cost of a MiniLM-L6-sized cross-encoder over the first D candidates (torch {cost['torch_threads']} "
        f"threads; {cost['uptime']}): "
        + ", ".join(f"D={d}: {ms} ms" for d, ms in cost["median_ms_per_depth"].items()),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = study_parser(__doc__)
    ap.add_argument("--files", nargs="+", default=list(FILES), choices=FILES)
    ap.add_argument("--depths", type=int, nargs="+", default=[5, 10, 30, 100])
    ap.add_argument("--latency-questions", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    result: dict[str, Any] = {**study_header("rerank_bound.py"), "files": {}}
    result["rerank_cost"] = rerank_cost(args)
    for name in args.files:
        result["files"][name] = file_figures(name, args)
        print(name, json.dumps(result["files"][name]), flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    result["uptime_end"] = uptime()
    write_report(result, args, markdown(result))


if __name__ == "__main__":
    main()
