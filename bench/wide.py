"""Many small namespaces: maintain throughput per Ray worker count, and `memstage serve` under concurrent
clients (latency, errors, access counts sent against recorded).

    python bench/wide.py --namespaces 200 --turns 20 --workers 1 2 --clients 32 --queries 96 \
        --json bench/results/wide_cpu.json

Input (bench/wide_data.py): N namespaces of `--turns` LoCoMo dev turns each, recombined, stored once
as ingest leaves them (real parser and event commit, real level-0 rows made by a process pool,
embeddings as in the scale bench), in this process; `ingest` reports that. Then per worker count W,
smallest first: a copy of that store, and a fresh process that starts a local Ray of W CPUs (no GPU
unless --gpu: the scaling measured is the CPU workers'), the Prefect API and the W worker
processes with their encoder loaded (`setup_s`, not timed),
then runs the real maintain flow (compress, consolidate, update, index, forget: batches of
namespaces on the W workers over Arrow snapshots, commits in the flow's process) over the first
namespaces: all N for the largest W, `--small-namespaces` K per worker (K*W) for the others
(default N*W/max W; `--same-size`: all N). namespaces/s and turns/s are over that maintain run,
the workers' model loads included. `lost` per run: turns sent to its namespaces minus turns stored,
plus namespaces left without a current index; the largest over runs. `--max-seconds` caps the
whole run: the largest W maintains only as many namespaces as the rate measured at the W before it
(scaled linearly to its workers) says fit the time left, reported as its `namespaces` (skipped if
fewer than its workers); `--serve-workers 1 2` runs the serve load once per `memstage serve --workers`
count (each with its server CPU per request and closed-loop floor); a run that overruns is killed with its Ray and reported as timed out. Keep the smaller runs small (--small-namespaces)
so that the largest maintains all N. Progress goes to stderr, the JSON to stdout (and --json). Imports:
the standard library, numpy, pyarrow, ray, prefect and memstage (no psutil, no httpx).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
DATA = REPO.parent / "shared" / "data" / "locomo" / "locomo-dev.json"
# One converted generator tokenizer per machine (else each fresh store converts its own).
os.environ.setdefault("MEMSTAGE_MODELS", str(Path.home() / ".cache" / "memstage-models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHOWN = (" ok, ", "namespaces/s", "failed", "Error", "Traceback")  # child log lines passed on


def log(msg: str) -> None:
    print(f"[wide {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def warm_workers(workers: int) -> None:
    """Start the `workers` Ray worker processes and load their encoder before the timer starts (Ray
    reuses them for the stage tasks): otherwise each run pays their start-up once per worker, a
    larger share of a short run than of a long one, and the speed-up over the smallest run would
    come out too high."""
    import ray

    @ray.remote(num_cpus=1)
    def warm() -> int:
        import memstage.flows.fanout  # noqa: F401 - what a stage task imports
        from memstage.runtime.services import worker_encoder

        worker_encoder().encode(["warm"])
        time.sleep(1.0)  # held until the others have started: one per worker process
        return os.getpid()

    ray.get([warm.remote() for _ in range(workers)])


def maintain_child(workers: int, home: Path, count: int, gpu: bool) -> dict[str, Any]:
    """Maintain the first `count` namespaces of `home` on a local Ray of `workers` CPUs (own process)."""
    import functools

    import ray

    from memstage.flows.stages import maintain_flow
    from memstage.runtime.backends import RuntimeConfig, ensure_ray, prefect_settings
    from memstage.stores.store import MemoryStore

    # memstage starts Ray as always (its workers' environment, its trimmed processes); only the CPUs
    # (and whether a GPU is seen) are the bench's
    ray.init = functools.partial(ray.init, num_cpus=workers, **({} if gpu else {"num_gpus": 0}))
    config = RuntimeConfig(home=home, runner="ray")
    names = [f"w{k:05d}" for k in range(count)]  # bench/wide_data.py's names
    stored = set(MemoryStore(home).namespaces())
    start = time.perf_counter()
    with prefect_settings(config, use_ray=True):
        ensure_ray(config)
        warm_workers(workers)
        setup_s = time.perf_counter() - start
        start = time.perf_counter()
        report = maintain_flow(names, config, True)
        maintain_s = time.perf_counter() - start
    store = MemoryStore(home)
    where = "namespace IN (SELECT unnest(?))"
    events = store.query(f"SELECT count(*) AS n FROM events WHERE {where}", [names]).column("n")[0].as_py()
    indexed = (
        store.query(
            f"SELECT count(DISTINCT namespace) AS n FROM index_manifest WHERE current AND {where}", [names]
        )
        .column("n")[0]
        .as_py()
    )
    return {
        "namespaces": len(names),
        "turns": events,
        "namespaces_per_s": round(len(names) / maintain_s, 2),
        "turns_per_s": round(events / maintain_s, 1),
        "maintain_s": round(maintain_s, 2),
        "setup_s": round(setup_s, 2),
        "stages_s": {s: r["duration_s"] for s, r in report["stages"].items()},
        "failed_stages": report["failed"],
        "namespaces_indexed": indexed,
        "namespaces_missing": sum(ns not in stored for ns in names),
    }


def run_child(w: int, home: Path, count: int, gpu: bool, limit_s: float) -> dict[str, Any]:
    """`maintain_child` in a fresh process (its own session: a timeout kills its Ray too)."""
    cmd = [sys.executable, __file__, "--child", str(w), "--home", str(home), "--count", str(count)]
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "INFO"}
    proc = subprocess.Popen(cmd + (["--gpu"] if gpu else []), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)  # fmt: skip

    def relay() -> None:
        for line in proc.stderr:
            if any(s in line for s in SHOWN):
                log(f"W={w}: {line.rstrip()[:200]}")

    relayer = threading.Thread(target=relay, daemon=True)
    relayer.start()
    try:
        out, _ = proc.communicate(timeout=max(1.0, limit_s))
    except subprocess.TimeoutExpired:
        return {"timed_out": True, "limit_s": round(limit_s, 1)}
    finally:
        if proc.poll() is None:  # timed out, or this process is stopping: its Ray goes too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    relayer.join(5)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "namespaces": count}
    return json.loads(out.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--namespaces", type=int, default=200)
    ap.add_argument("--turns", type=int, default=20, help="turns per namespace")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--small-namespaces", type=int, help="per worker, below the largest worker count")
    ap.add_argument("--same-size", action="store_true", help="every worker count maintains all namespaces")
    ap.add_argument("--gpu", action="store_true", help="let Ray see the GPU (the services actor embeds)")
    ap.add_argument("--clients", type=int, default=32, help="concurrent serve clients (0: no serve load)")
    ap.add_argument("--queries", type=int, default=96)
    ap.add_argument("--serve-namespaces", type=int, default=16, help="namespaces the serve load asks")
    ap.add_argument(
        "--serve-workers", type=int, nargs="+", default=[1],
        help="`memstage serve --workers` for the load; several: one load each, `serve` is the last",
    )  # fmt: skip
    ap.add_argument("--max-seconds", type=float, default=3600, help="cap on the whole run's wall time")
    ap.add_argument("--data", type=Path, default=DATA, help="the LoCoMo dev split (locomo-dev.json)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "memstage-bench")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one, removed)")
    ap.add_argument("--json", type=Path, help="write the result here too")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)  # internal: one worker count
    ap.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def measure(args: argparse.Namespace, work: Path, deadline: float) -> dict[str, Any]:
    from wide_data import embeddings, ingest, synthesise

    data = work / "wide.jsonl"
    turns, source, per_namespace = synthesise(args.data, args.namespaces, args.turns, data)
    log(f"{args.namespaces} namespaces, {turns} turns synthesised")
    emb = embeddings(args.data, args.cache)
    start = time.perf_counter()
    template = work / "template"
    stored = ingest(data, template, source, emb, log)
    ingest_s = time.perf_counter() - start
    ingested = {**stored, "s": round(ingest_s, 2), "namespaces_per_s": round(args.namespaces / ingest_s, 1),
                "turns_per_s": round(turns / ingest_s, 1), "where": "this process, once (see bench/wide_data.py)"}  # fmt: skip
    log(f"ingest: {ingested}")
    runs: dict[int, dict[str, Any]] = {}
    top = max(args.workers)
    serve_reserve = 60 if args.clients else 0
    order = sorted(set(args.workers))  # smallest first: each measured rate sizes the runs after it
    for i, w in enumerate(order):
        count = planned(args, w, top, runs)
        left = deadline - time.monotonic() - serve_reserve
        if left < 10:
            runs[w] = {"skipped": "time cap"}
            log(f"W={w}: skipped (time cap)")
            continue
        if w == top and i:  # the largest maintains what fits the time left (the others are small)
            count = fitted(count, w, runs, left)
        if count < w:
            runs[w] = {"skipped": "time cap (fewer namespaces than workers would fit)"}
            log(f"W={w}: skipped (time cap)")
            continue
        home = work / f"home-{w}"
        shutil.copytree(template, home)
        log(f"W={w}: maintaining {count} namespaces (at most {left:.0f} s)")
        runs[w] = run_child(w, home, count, args.gpu, left)
        log(f"W={w}: {runs[w]}")
    serve = serve_over(args, work, runs, deadline)
    return {"ingest": ingested, "runs": runs, "turns": turns, "per_namespace": per_namespace, "serve": serve}


def planned(args: argparse.Namespace, w: int, top: int, runs: dict) -> int:
    """Namespaces worker count `w` maintains: all N for the largest (or with --same-size), else
    --small-namespaces per worker, else N*w/top."""
    if w == top or args.same_size:
        return args.namespaces
    if args.small_namespaces:
        return min(args.namespaces, args.small_namespaces * w)
    return max(1, round(args.namespaces * w / top))


FIXED_S = 10.0  # a maintain run's cost whatever its size: five stage flows, about 2 s each (measured here)


def fitted(count: int, w: int, runs: dict, left: float) -> int:
    """`count`, or fewer if the rate of the largest worker count run so far (its fixed cost taken
    out), scaled linearly to `w` workers, says `count` would not be done in `left` seconds less the
    set-up and the fixed cost; 0 if nothing would."""
    done = [(v, r) for v, r in runs.items() if "namespaces_per_s" in r]
    if not done:
        return count
    v, r = max(done, key=lambda d: d[0])
    rate = r["namespaces"] / max(1.0, r["maintain_s"] - FIXED_S) * w / v
    fits = int(max(0.0, left - 1.5 * r["setup_s"] - FIXED_S) * rate * 0.9)
    if fits < count:
        log(f"W={w}: {count} namespaces would take about {count / rate:.0f} s; {fits} fit the time cap")
    return min(count, fits)


def serve_over(args: argparse.Namespace, work: Path, runs: dict, deadline: float) -> dict[str, Any]:
    done = [w for w, r in runs.items() if "namespaces_per_s" in r]
    if not args.clients or not done or time.monotonic() > deadline:
        return {"skipped": "no clients asked, no maintained store, or time cap"}
    from wide_serve import serve_load

    w = min(done)
    namespaces = [f"w{k:05d}" for k in range(min(args.serve_namespaces, runs[w]["namespaces"]))]
    settle = time.monotonic() + 90  # the maintain runs' Ray processes wind down first (at most 90 s)
    while os.getloadavg()[0] > len(os.sched_getaffinity(0)) and time.monotonic() < settle:
        time.sleep(5)
    log(f"serve: {args.clients} clients over {len(namespaces)} namespaces of the W={w} store")
    by_workers = {}
    for n in args.serve_workers:
        by_workers[str(n)] = serve_load(work / f"home-{w}", namespaces, args.clients, args.queries, n)
        log(f"serve --workers {n}: {by_workers[str(n)]}")
    return {**by_workers[str(args.serve_workers[-1])], "by_server_workers": by_workers}


def summarise(args: argparse.Namespace, got: dict[str, Any], argv: list[str] | None) -> dict[str, Any]:
    runs = got["runs"]
    ok = {w: r for w, r in runs.items() if "namespaces_per_s" in r}
    base = ok.get(min(ok)) if ok else None
    for w, r in ok.items():
        r["speedup"] = round(r["namespaces_per_s"] / base["namespaces_per_s"], 2) if base else None
        r["of_linear"] = round(r["speedup"] * min(ok) / w, 2) if base else None
    sent = got["per_namespace"]
    for r in ok.values():  # turns sent to its namespaces but not stored, and namespaces left unindexed
        r["lost"] = sum(sent[: r["namespaces"]]) - r["turns"] + r["namespaces"] - r["namespaces_indexed"]
    lost = max([r["lost"] for r in ok.values()] or [None])
    return {
        "workers": {str(w): runs[w] for w in sorted(runs)},
        "namespaces": args.namespaces,
        "turns": got["turns"],
        "turns_per_namespace": args.turns,
        "ingest": got["ingest"],
        "lost": lost,
        "serve": got["serve"],
        "command": "python bench/wide.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.node()}: {os.cpu_count()} cores",
        "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(maintain_child(args.child, args.home, args.count, args.gpu)))
        return 0
    deadline = time.monotonic() + args.max_seconds
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a stopped bench stops its runs too
    work = args.work or Path(tempfile.mkdtemp(prefix="memstage-wide-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = summarise(args, measure(args, work, deadline), argv)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    log("workers  namespaces  namespaces/s  turns/s  speed-up  of linear")
    for w, r in result["workers"].items():
        if "namespaces_per_s" in r:
            log(f"{w:>7}  {r['namespaces']:>10}  {r['namespaces_per_s']:>12}  {r['turns_per_s']:>7}  "
                f"{r['speedup']:>7}x  {r['of_linear']:>9}")  # fmt: skip
        else:
            log(f"{w:>7}  {r}")
    log(f"lost: {result['lost']}; serve: {result['serve']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
