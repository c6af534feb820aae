"""Many small namespaces: ingest + maintain throughput per Ray worker count, and `memstage serve` under
concurrent clients (latency, errors, access counts sent against recorded).

    python bench/wide.py --namespaces 12 --turns 30 --workers 1 2 --clients 8 --queries 96 \
        --json bench/results/wide_cpu.json

Namespaces: LoCoMo dev conversations recombined (bench/scale_data.py's recipe, cheaper): namespace k
takes `--turns` consecutive turns of dev conversation k mod C from a session offset that grows with
k, its speakers renamed from a pool of names (in the texts too) and its dates shifted. Per worker
count W, a fresh process starts a local Ray with W CPUs and runs the real ingest flow (the encoder
pool, one encoder per CPU) and then the real maintain flow (stage tasks on W workers over Arrow
snapshots, commits in the flow's process) into a fresh data directory; namespaces/s and turns/s are
over ingest + maintain. `lost` is the turns sent minus the events stored (plus namespaces missing).
Serving: `memstage serve --insecure-local` on loopback over the first worker count's store; one
client asks `--queries` retrieval-only questions in a row (the single-client p95), then `--clients`
clients ask the same number at once; afterwards the server stops (its access journal is merged at
shutdown) and the access counts recorded are compared with the memories the replies named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
DATA = REPO.parent / "shared" / "data" / "locomo" / "locomo-dev.json"
from scale_data import FIRST  # noqa: E402 - bench/ is on the path from the line above

NAMES = FIRST[:14]  # the scale bench's first names: one list for both synthetic benches
QUESTIONS = ["What did they do last weekend?", "Where does she work?", "What is his hobby?", "family", "trip"]


def synthesise(n: int, turns: int, out: Path) -> int:
    """JSONL of `n` namespaces of `turns` turns each; returns the turns written."""
    from datetime import timedelta

    from scale_data import dev_turns

    all_turns = dev_turns(DATA)
    by_conv: dict[str, list[dict[str, Any]]] = {}
    for t in all_turns:
        by_conv.setdefault(t["conv"], []).append(t)
    convs = sorted(by_conv)
    written = 0
    with out.open("w") as f:
        for k in range(n):
            rows = by_conv[convs[k % len(convs)]]
            start = (k // len(convs) * turns) % max(1, len(rows) - turns)
            speakers = sorted({t["speaker"] for t in rows})
            rename = {s: NAMES[(k + i) % len(NAMES)] + str(k) for i, s in enumerate(speakers)}
            for t in rows[start : start + turns]:
                text = t["text"]
                for old, new in rename.items():
                    text = text.replace(old, new)
                when = t["time"] + timedelta(days=k % 365)
                row = {"namespace": f"w{k:05d}", "session": f"{t['session']}", "speaker": rename[t["speaker"]],
                       "text": text, "time": when.isoformat()}  # fmt: skip
                f.write(json.dumps(row) + "\n")
                written += 1
    return written


def one_worker_count(workers: int, data: Path, home: Path) -> dict[str, Any]:
    """Ingest + maintain `data` into `home` on a local Ray of `workers` CPUs (run in its own process)."""
    import ray

    os.environ["MEMSTAGE_RUNNER"] = "ray"
    os.environ["MEMSTAGE_ENCODERS"] = str(workers)
    ray.init(num_cpus=workers, include_dashboard=False, namespace="memstage", log_to_driver=False)
    from memstage.flows.ingest import run_ingest
    from memstage.flows.stages import run_maintain
    from memstage.runtime.backends import RuntimeConfig
    from memstage.stores.store import MemoryStore

    config = RuntimeConfig(home=home, runner="ray")
    start = time.perf_counter()
    ingested = run_ingest(data, "jsonl", None, config, False)
    ingest_s = time.perf_counter() - start
    report = run_maintain(None, config)
    total = time.perf_counter() - start
    store = MemoryStore(home)
    return {
        "ingest_s": round(ingest_s, 2),
        "maintain_s": round(total - ingest_s, 2),
        "failed": report["failed"],
        "maintain_throughput": report["throughput"],
        "events": store.counts()["events"],
        "namespaces_stored": len(store.namespaces()),
        "events_new": ingested["events_new"],
        "total_s": round(total, 2),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ask(base: str, namespace: str, question: str) -> tuple[float, int, bool]:
    body = json.dumps({"question": question, "namespace": namespace, "answer": False}).encode()
    req = urllib.request.Request(base + "/memstage/query", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            n = len(json.loads(r.read())["memories"])
        return (time.perf_counter() - start) * 1000, n, True
    except Exception:  # noqa: BLE001 - counted as an error
        return (time.perf_counter() - start) * 1000, 0, False


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 1) if s else 0.0


def serve_load(home: Path, namespaces: list[str], clients: int, queries: int) -> dict[str, Any]:
    from memstage.stores.store import MemoryStore

    def recorded() -> int:
        return int(
            MemoryStore(home)
            .query("SELECT coalesce(sum(access_count), 0) AS n FROM memories")
            .column("n")[0]
            .as_py()
        )

    before = recorded()
    port = _free_port()
    env = {**os.environ, "MEMSTAGE_RUNNER": "local"}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "memstage.cli.main", "serve", "--insecure-local", "--host", "127.0.0.1",
         "--port", str(port), "--home", str(home)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not (home / "serve.json").exists():  # announced once its models are warm
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("memstage serve did not come up")
            time.sleep(0.5)
        work = [(namespaces[i % len(namespaces)], QUESTIONS[i % len(QUESTIONS)]) for i in range(queries)]
        warm = [_ask(base, ns, QUESTIONS[0]) for ns in namespaces]  # each namespace's indexes loaded once
        single = [_ask(base, ns, q) for ns, q in work]
        with ThreadPoolExecutor(clients) as pool:
            many = list(pool.map(lambda a: _ask(base, *a), work))
    finally:
        server.send_signal(signal.SIGINT)  # uvicorn's shutdown: the lifespan merges the journal
        server.wait(120)
    both = warm + single + many
    return {
        "clients": clients,
        "queries": queries,
        "p50_ms": _pct([t for t, _, ok in many if ok], 0.5),
        "p95_ms": _pct([t for t, _, ok in many if ok], 0.95),
        "p50_single_ms": _pct([t for t, _, ok in single if ok], 0.5),
        "p95_single_ms": _pct([t for t, _, ok in single if ok], 0.95),
        "errors": sum(not ok for _, _, ok in both),
        "accesses_sent": sum(n for _, n, _ in both),
        "accesses_recorded": recorded() - before,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--namespaces", type=int, default=12)
    ap.add_argument("--turns", type=int, default=30, help="turns per namespace")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--queries", type=int, default=96)
    ap.add_argument("--json", type=Path, help="write the result here too")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one worker count, in this process
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one_worker_count(args.one, args.data, args.home)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="memstage-wide-"))
    try:
        data = work / "wide.jsonl"
        turns = synthesise(args.namespaces, args.turns, data)
        runs = {}
        for w in args.workers:
            home = work / f"home-{w}"
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(w), "--data", str(data), "--home", str(home)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            runs[w] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{w} worker(s): {runs[w]}", file=sys.stderr)
        first = work / f"home-{args.workers[0]}"
        namespaces = [f"w{k:05d}" for k in range(args.namespaces)]
        serve = serve_load(first, namespaces, args.clients, args.queries)
        lost = max(turns - r["events"] + (args.namespaces - r["namespaces_stored"]) for r in runs.values())
        result = {
            "workers": {
                str(w): {
                    "namespaces_per_s": round(args.namespaces / r["total_s"], 3),
                    "turns_per_s": round(turns / r["total_s"], 1),
                    **r,
                }
                for w, r in runs.items()
            },
            "namespaces": args.namespaces,
            "turns": turns,
            "lost": lost,
            "serve": serve,
            "command": "python bench/wide.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.node()}: {os.cpu_count()} cores, shared with other agents' work",
            "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    one = runs[args.workers[0]]["total_s"]
    print("workers  namespaces/s  turns/s  speed-up vs 1st", file=sys.stderr)
    for w, r in result["workers"].items():
        print(
            f"{w:>7}  {r['namespaces_per_s']:>12}  {r['turns_per_s']:>7}  {one / runs[int(w)]['total_s']:.2f}x",
            file=sys.stderr,
        )
    print(f"serve: {serve}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
