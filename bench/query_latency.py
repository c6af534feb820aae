"""Query latency: warm retrieval p50/p95 through the services actor and in-process, and a new-process query.

Retrieval latency per question is measured on a warm process (indexes loaded, encoder loaded), over
the LoCoMo dev questions of one conversation: through the long-lived Ray actor (what a query flow on
Ray uses) and in-process (the baseline, no Ray hop). Then the wall time of a second `memstage query`
in a new process (the first one converts and caches what it can), which includes Prefect's start-up.

    python bench/query_latency.py --data ../shared/data/locomo/locomo-dev.json [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p95": round(float(np.percentile(ms, 95)), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/locomo/locomo-dev.json")
    ap.add_argument("--conversation", default="conv-26")
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not args.data.exists():
        print(json.dumps({"skipped": f"no data at {args.data}"}))
        return 0

    from memstage.flows.ingest import run_ingest
    from memstage.runtime.backends import RuntimeConfig
    from memstage.runtime.services import services

    sample = next(s for s in json.loads(args.data.read_text()) if s["sample_id"] == args.conversation)
    questions = [q["question"] for q in sample["qa"] if q.get("category") in (1, 2, 3, 4)][: args.questions]
    result: dict = {"conversation": args.conversation, "questions": len(questions), "budget": args.budget}
    with tempfile.TemporaryDirectory() as tmp:
        conv = Path(tmp) / "conv.json"
        conv.write_text(json.dumps([sample]))
        home = Path(tmp) / "home"
        config = RuntimeConfig(home=home, runner="ray")
        run_ingest(conv, "locomo", None, config, show_progress=False)

        for label, use_ray in (("actor", True), ("in_process", False)):
            svc = services(config, use_ray=use_ray)
            svc.retrieve(args.conversation, questions[0], args.budget)  # warm
            ms = []
            for q in questions:
                t0 = time.perf_counter()
                svc.retrieve(args.conversation, q, args.budget)
                ms.append((time.perf_counter() - t0) * 1000)
            result[f"retrieve_ms_{label}"] = percentiles(ms)

        cmd = [
            sys.executable,
            "-m",
            "memstage.cli.main",
            "query",
            questions[0],
            "--namespace",
            args.conversation,
            "--home",
            str(home),
            "--json",
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        walls = []
        for _ in range(2):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            walls.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                result["query_error"] = proc.stderr[-2000:]
                break
        result["new_process_query_s"] = {"first": round(walls[0], 2), "second": round(walls[-1], 2)}
        if proc.returncode == 0:
            result["second_query_usage"] = json.loads(proc.stdout).get("usage")
    print(json.dumps(result))
    if not args.json:
        a, b = result["retrieve_ms_actor"], result["retrieve_ms_in_process"]
        print(
            f"\n{'retrieval (ms)':<24}{'p50':>8}{'p95':>8}\n{'via Ray actor':<24}{a['p50']:>8}{a['p95']:>8}\n"
            f"{'in process':<24}{b['p50']:>8}{b['p95']:>8}\n"
            f"second `memstage query` in a new process: {result['new_process_query_s']['second']} s",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
