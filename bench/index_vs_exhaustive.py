"""The index path's recall against an exhaustive scan with the same scoring, on prepared data directories.

Issue 16's quality goal: on the dev split and every robustness variant, the candidate path's
recall@1000 stays within 0.005 of scoring every memory. `memstage eval` reports both for one file
(its `exhaustive` key); this runs both retrievers over stores already prepared by
`bench/fusion_cv.py` / `bench/passage_split.py` (`--work/home-<file>`, or `--homes` for another
folder of them), so a change to the stores' preparation (the topic split of long turns) is checked
on every variant without preparing them again.

    python bench/index_vs_exhaustive.py --data ../shared/data/locomo/locomo-dev.json --work /tmp/fusion2 \
        --homes /tmp/fusion2/split-topic --files long assistant ontopic --out ... --table ...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fusion_cv import retriever_for, study_parser, write_report  # noqa: E402

BUDGET = 1000


def main() -> None:
    from memstage.tasks.evaluate import load_questions, own_memories, run_questions, summarise
    from memstage.tasks.retrieve import Retriever

    ap = study_parser(__doc__)
    ap.add_argument("--files", nargs="+", default=["dev"])
    ap.add_argument("--homes", type=Path, default=None, help="where home-<file> lie, when not --work")
    args = ap.parse_args()
    result = {"command": "python bench/index_vs_exhaustive.py " + " ".join(sys.argv[1:]), "files": {}}
    result["machine"] = f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}"
    rows = [
        "| file | index path | exhaustive | index minus exhaustive | p95 ms (index) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in args.files:
        path = args.data if name == "dev" else args.work / "variants" / f"{name}.json"
        index = retriever_for((args.homes or args.work) / f"home-{name}")
        scan = Retriever(index.store, index.encoder, index.token_counter, exhaustive=True)
        questions = load_questions(path).items
        owns = {ns: own_memories(index.store, ns) for ns in {q.namespace for q in questions}}
        got = {
            label: summarise(run_questions(r.retrieve, questions, owns, (BUDGET,)))
            for label, r in (("index", index), ("exhaustive", scan))
        }
        a, b = got["index"]["recall"][str(BUDGET)], got["exhaustive"]["recall"][str(BUDGET)]
        p95 = got["index"]["latency_ms"][str(BUDGET)]["p95"]
        result["files"][name] = {
            "index": a,
            "exhaustive": b,
            "index_minus_exhaustive": round(a - b, 4),
            "p95_ms": p95,
        }
        rows.append(f"| {name} | {a:.4f} | {b:.4f} | {a - b:+.4f} | {p95} |")
    write_report(result, args, f"`{result['command']}`; {result['machine']}\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
