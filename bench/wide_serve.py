"""`memstage serve` under concurrent clients, for bench/wide.py: latency, errors, access counts sent
against recorded.

`memstage serve --insecure-local --workers W` on loopback over a maintained store; each namespace is
asked once (its indexes loaded), then one client asks `queries` retrieval-only questions in a row (the
single-client p95), then `clients` clients ask the same number at once; afterwards the server
stops (its access journals are merged at shutdown) and the access counts recorded are compared with
the memories the replies named. The server's CPU time per request (its processes, from /proc) is
reported for both phases: under a closed loop of n clients on c cores, p95 can be no lower than
about n x (CPU per request under load) / c, whatever one client's latency is. Standard library only
on the client side (urllib).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

QUESTIONS = ["What did they do last weekend?", "Where does she work?", "What is his hobby?", "family", "trip"]


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


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and its children alive now (the supervisor's workers)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def serve_load(
    home: Path, namespaces: list[str], clients: int, queries: int, workers: int = 1
) -> dict[str, Any]:
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
         "--port", str(port), "--home", str(home), "--workers", str(workers)],
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
        # each namespace's indexes loaded in every worker: the kernel hands connections to any of them,
        # so each namespace is asked a few times per worker (a worker's first question about a
        # namespace loads its indexes: tens of ms that would land in the single-client p95)
        warm = [_ask(base, ns, QUESTIONS[0]) for _ in range(1 + 3 * (workers - 1)) for ns in namespaces]
        cpu0 = _cpu_s(server.pid)
        single = [_ask(base, ns, q) for ns, q in work]
        cpu1 = _cpu_s(server.pid)
        with ThreadPoolExecutor(clients) as pool:
            many = list(pool.map(lambda a: _ask(base, *a), work))
        cpu2 = _cpu_s(server.pid)
    finally:
        server.send_signal(signal.SIGINT)  # uvicorn's shutdown: the lifespan merges the journal
        server.wait(120)
    both = warm + single + many
    cpu_many = (cpu2 - cpu1) / len(work) * 1000
    cores = len(os.sched_getaffinity(0))
    single_p95 = _pct([t for t, _, ok in single if ok], 0.95)
    return {
        "clients": clients,
        "queries": queries,
        "server_workers": workers,
        "server_cpu_ms_per_request_single": round((cpu1 - cpu0) / len(work) * 1000, 2),
        "server_cpu_ms_per_request_many": round(cpu_many, 2),
        # n clients in a closed loop keep n requests in flight: each waits for about n x (server CPU per
        # request) / cores, whatever one client alone waits. Over the single-client p95, the ratio no
        # server of this CPU cost can beat on this machine.
        "closed_loop_floor_ms": round(clients * cpu_many / cores, 1),
        "closed_loop_floor_ratio": round(clients * cpu_many / cores / single_p95, 2) if single_p95 else None,
        "cores": cores,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "p50_ms": _pct([t for t, _, ok in many if ok], 0.5),
        "p95_ms": _pct([t for t, _, ok in many if ok], 0.95),
        "p50_single_ms": _pct([t for t, _, ok in single if ok], 0.5),
        "p95_single_ms": _pct([t for t, _, ok in single if ok], 0.95),
        "errors": sum(not ok for _, _, ok in both),
        "accesses_sent": sum(n for _, n, _ in both),
        "accesses_recorded": recorded() - before,
    }
