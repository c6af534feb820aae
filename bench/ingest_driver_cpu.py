"""Driver CPU per turn of the ingest flow: the flow's own process, with the encoder taken out (diagnostic).

DIAGNOSTIC, not a throughput figure: everything is the real ingest flow (Prefect, the DuckDB store,
parsing, level-0 rows and their ops, the indexes) except that `Encoder.encode` returns a constant
unit vector per text, so the CPU this process spends is the driver's own work, which on a GPU host
must stay under about 20 us per turn for 50k turns/s. Runs the flow locally (no Ray: the encoder
stub lives in this process), a warm-up ingest first, then one timed ingest under a new prefix.

--baseline-python PY runs the same measurement with another interpreter whose `memstage` is another
tree (a worktree at the commit before), in the same run, and prints both:
    python bench/ingest_driver_cpu.py --replicate 4 --baseline-python /work/wt/base/.venv/bin/python
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from ingest_throughput import replicate  # noqa: E402 - the throughput bench's copies of LoCoMo


def stub_encoder() -> None:
    """Replace the model's forward by a constant unit vector per text (the diagnostic part)."""
    import numpy as np

    from memstage.gpu.encoder import DIMS, Encoder

    unit = np.full(DIMS, 1.0 / np.sqrt(DIMS), dtype=np.float32)

    def encode(self: Any, texts: Any, **_: Any) -> Any:
        return np.tile(unit, (len(texts), 1))

    Encoder.encode = encode  # type: ignore[method-assign]


def children_cpu() -> dict[int, float]:
    """CPU seconds so far of this process's child processes (the worker pool, Prefect's server)."""
    import psutil

    out = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            if "prefect" in " ".join(proc.cmdline()) or "uvicorn" in " ".join(proc.cmdline()):
                continue  # the API server: not the driver's work
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system
        except psutil.Error:
            continue
    return out


def measure(data: Path, copies: int, profile: Path | None) -> dict[str, Any]:
    from memstage.flows.ingest import run_ingest
    from memstage.runtime.backends import RuntimeConfig

    stub_encoder()
    with tempfile.TemporaryDirectory() as tmp:
        big = replicate(data, copies, Path(tmp))
        config = RuntimeConfig(home=Path(tmp) / "home", runner="local")
        run_ingest(data, "locomo", "warmup", config, show_progress=False)  # imports, models, Prefect
        prof = None
        if profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        kids0, cpu0, t0 = children_cpu(), time.process_time(), time.perf_counter()
        main0 = time.thread_time()
        out = run_ingest(big, "locomo", "round0", config, show_progress=False)
        cpu, wall, main = time.process_time() - cpu0, time.perf_counter() - t0, time.thread_time() - main0
        kids = {pid: v - kids0.get(pid, 0.0) for pid, v in children_cpu().items()}
        if prof:
            prof.disable()
            prof.dump_stats(str(profile))
    turns = out["events_new"]
    return {
        "turns": turns,
        "namespaces": len(out["namespaces"]),
        "driver_cpu_s": round(cpu, 3),
        "driver_cpu_us_per_turn": round(cpu / turns * 1e6, 1),
        # the flow's own thread (parsing, plans, table work, store calls), without DuckDB's worker
        # threads, Prefect's client threads and the in-process encoder thread of the local runner
        "driver_main_thread_cpu_us_per_turn": round(main / turns * 1e6, 1),
        "pool_processes_cpu_s": round(sum(kids.values()), 3),  # the worker pool (tasks/workers.py)
        "driver_and_pool_cpu_us_per_turn": round((cpu + sum(kids.values())) / turns * 1e6, 1),
        "wall_s": round(wall, 3),
        "turns_per_s_stub_encoder": round(turns / wall, 1),
        "phases_s": out.get("phases"),  # the flow thread's wall per phase (runtime/phases.py)
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/locomo/locomo-dev.json")
    ap.add_argument("--replicate", type=int, default=4)
    ap.add_argument("--profile", type=Path, default=None, help="cProfile the timed ingest into this file")
    ap.add_argument("--baseline-python", default=None, help="interpreter of the tree to compare with")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.data, args.replicate, args.profile)))
        return 0
    if not args.data.exists():
        print(json.dumps({"skipped": f"no data at {args.data}"}))
        return 0
    runs = {}
    trees = [("baseline", args.baseline_python)] if args.baseline_python else []
    for name, python in [*trees, ("this_tree", sys.executable)]:
        cmd = [python, __file__, "--child", "--data", str(args.data), "--replicate", str(args.replicate)]
        if args.profile and name == "this_tree":
            cmd += ["--profile", str(args.profile)]
        env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/tmp", check=False)
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
        runs[name]["memstage"] = subprocess.run(
            [python, "-c", "import memstage; print(memstage.__file__)"],
            capture_output=True,
            text=True,
            cwd="/tmp",
        ).stdout.strip()
        print(f"{name}: {json.dumps(runs[name])}", file=sys.stderr, flush=True)
    result = {
        "what": "DIAGNOSTIC: driver CPU of the real ingest flow (local runner) with Encoder.encode stubbed",
        "runs": runs,
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{os.uname().nodename}: {os.cpu_count()} CPUs (shared)",
        "command": "python " + " ".join(sys.argv),
    }
    if "baseline" in runs:
        b, a = runs["baseline"]["driver_cpu_us_per_turn"], runs["this_tree"]["driver_cpu_us_per_turn"]
        result["speedup_driver_cpu"] = round(b / a, 2)
        key = "driver_main_thread_cpu_us_per_turn"
        result["speedup_driver_main_thread_cpu"] = round(runs["baseline"][key] / runs["this_tree"][key], 2)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
