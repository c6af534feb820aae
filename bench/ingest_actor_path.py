"""The GPU host's ingest path on a CPU machine: Ray told it has one GPU, so the flow encodes in the services
actor ("actor" placement, one encoder) with its chunks pre-tokenised on the worker pool or not, alternately.

DIAGNOSTIC, not a GPU figure: the model runs on the CPU (torch sees no card), so the encoder's time is
the model's and pre-tokenising can only move the tokenising off it. What it shows here is that the
path runs end to end (every turn embedded, ids or texts) and where each ingest's time went: the
flow's phases and the encoder's report (runtime/phases.py). A warm-up ingest first, then the rounds
alternately with MEMSTAGE_ENCODER_PRETOKENISE=0 and 1, each under a new namespace prefix:

    MEMSTAGE_SCAN_WORKERS=2 python bench/ingest_actor_path.py --rounds 2 --out bench/results/...
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

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/locomo/locomo-dev.json")
    ap.add_argument("--rounds", type=int, default=2, help="pairs of ingests: pre-tokenised off, then on")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not args.data.exists():
        print(json.dumps({"skipped": f"no data at {args.data}"}))
        return 0
    import ray

    start_ray = ray.init
    ray.init = lambda *a, **k: start_ray(*a, num_gpus=1, **k)  # the one stand-in: a GPU resource for Ray
    from memstage.flows.ingest import run_ingest
    from memstage.runtime.backends import RuntimeConfig
    from memstage.settings import apply_process_defaults, get_settings

    apply_process_defaults()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        config = RuntimeConfig(home=Path(tmp) / "home", runner="ray")
        plan = [("warmup", "1")] + [(f"r{r}-{on}", on) for r in range(args.rounds) for on in ("0", "1")]
        for name, pretokenise in plan:
            os.environ["MEMSTAGE_ENCODER_PRETOKENISE"] = pretokenise
            get_settings.cache_clear()
            t0 = time.perf_counter()
            out = run_ingest(args.data, "auto", name, config, show_progress=False)
            wall = time.perf_counter() - t0
            runs.append(
                {
                    "prefix": name,
                    "pretokenise": pretokenise == "1",
                    "wall_s": round(wall, 2),
                    "turns": out["events_new"],
                    "embedded": sum(r["embedded"] for r in out["indexed"].values()),
                    "turns_per_s": round(out["events_new"] / wall, 1),
                    "phases_s": out["phases"],
                    "encoders": out["encoders"],
                    "load_average": [round(x, 2) for x in os.getloadavg()],
                }
            )
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    result = {
        "what": "DIAGNOSTIC: the GPU host's ingest path (services-actor encoder, pre-tokenised chunks) run on "
        "CPU with Ray given a stand-in GPU resource; the model on the CPU",
        "runs": runs,
        "machine": f"{os.uname().nodename}: {os.cpu_count()} CPUs (shared)",
        "code": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "command": "python " + " ".join(sys.argv),
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
