"""Query latency: warm retrieval p50/p95 through the services actor and in-process, and `memstage query` in a new process, cold and warm.

Retrieval latency per question is measured on a warm process (indexes loaded, encoder loaded), over
the LoCoMo dev questions of one conversation: through the long-lived Ray actor (what a query flow on
Ray uses) and in-process (the baseline, no Ray hop). Then the wall time of `memstage query` in a new
process, question to answer with the configured (embedded) generator: cold, with nothing running
(`first` also converts and caches the generator; `cold` = `second`), and warm, while a `memstage
serve` of the store holds the models (`warm_p50`/`warm_p95` over different questions, and
`warm_retrieve_p50` for `memstage retrieve`, no generator). No PREFECT_API_URL in the environment:
the queries are recorded in the store's `runs` table, not in a Prefect server. With `--prefect`, the
warm queries are asked again of a `memstage serve` that reports to a `prefect server start` of its
own (`warm_p50_prefect`; the service records each query as a flow run after answering, and
`prefect_query_flow_runs` counts the completed `query` runs the server holds at the end).
The generator reads MEMSTAGE_ANSWER_BUDGET tokens of the evidence (`answer_budget` in the JSON);
`--compare-answer-budgets 100 400` asks the warm questions again of a service at each of these
(`warm_by_answer_budget`).
The machine's load averages (1, 5, 15 min) are read at the start and at the end.

    python bench/query_latency.py --data ../shared/data/locomo/locomo-dev.json [--json] [--prefect]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p95": round(float(np.percentile(ms, 95)), 2)}


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "memstage.cli.main", *argv]


def timed_query(
    args: argparse.Namespace, home: Path, question: str, command: str = "query", env: dict | None = None
) -> tuple[float, dict]:
    """Wall seconds of one `memstage query` in a new process, and its JSON (or {"error": stderr})."""
    cmd = cli(command, question, "--namespace", args.conversation, "--home", str(home), "--json")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return wall, {"error": proc.stderr[-2000:]}
    return wall, json.loads(proc.stdout)


def start_service(home: Path, port: int, env: dict | None = None) -> subprocess.Popen:
    """`memstage serve` of the bench's store, in its own session; returns once HOME/serve.json says it
    is warm (models loaded)."""
    log = open(home / "serve.log", "w")  # noqa: SIM115 - kept open for the server's life
    proc = subprocess.Popen(
        cli("serve", "--home", str(home), "--port", str(port)),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while not (home / "serve.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"memstage serve did not come up: {(home / 'serve.log').read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


def start_prefect(folder: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """A `prefect server start` on a free loopback port with its own PREFECT_HOME; the environment of a
    process that reports to it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        PREFECT_HOME=str(folder / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_BLOCKS_REGISTER_ON_START="false",
        PREFECT_SERVER_UI_ENABLED="false",
    )
    log = open(folder / "prefect.log", "w")  # noqa: SIM115 - kept open for the server's life
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, {**env, "PREFECT_API_URL": url}
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    raise RuntimeError(f"prefect server did not come up: {(folder / 'prefect.log').read_text()[-2000:]}")


def query_flow_runs(api: str) -> int:
    """Completed flow runs of the `query` flow on the Prefect server at `api`."""
    body = json.dumps(
        {"flows": {"name": {"any_": ["query"]}}, "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
    )
    request = urllib.request.Request(
        f"{api}/flow_runs/count",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(json.loads(response.read()))


def warm_queries(
    args: argparse.Namespace, home: Path, questions: list[str], env: dict | None = None
) -> tuple[list, list, list]:
    """New-process `memstage query` walls while a `memstage serve` (with `env`) holds the models, their
    usages, and `memstage retrieve` walls of the same questions."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service = start_service(home, port, env)
    warm, usages = [], []
    try:
        timed_query(
            args, home, questions[0], env=env
        )  # the service's first answer builds its caches: not timed
        for q in questions[1 : 1 + args.warm_questions]:
            wall, out = timed_query(args, home, q, env=env)
            if "error" in out:
                raise RuntimeError(out["error"])
            warm.append(wall)
            usages.append(out.get("usage") or {})
        asked = questions[1 : 1 + args.warm_questions]
        retrieve = [timed_query(args, home, q, "retrieve", env=env)[0] for q in asked]
    finally:
        os.killpg(service.pid, signal.SIGTERM)
        service.wait(60)
    return warm, usages, retrieve


def new_process_queries(args: argparse.Namespace, home: Path, questions: list[str]) -> tuple[dict, dict]:
    """Cold: two `memstage query` processes with nothing running (the first also converts and caches
    the generator); warm: `memstage query` processes while a `memstage serve` holds the models, each a
    different question (no answer is reused; the evidence differs, so its prefill is paid each time)."""
    walls, extra = {}, {}
    for key in ("first", "second"):
        walls[key], out = timed_query(args, home, questions[0])
        if "error" in out:
            extra["query_error"] = out["error"]
            return {**{k: round(v, 2) for k, v in walls.items()}}, extra
        extra[key] = out.get("usage")
    walls["cold"] = walls["second"]
    warm, usages, retrieve = warm_queries(args, home, questions)
    if warm:
        walls.update(warm_p50=float(np.percentile(warm, 50)), warm_p95=float(np.percentile(warm, 95)))
        walls["warm_retrieve_p50"] = float(np.percentile(retrieve, 50))
        extra["warm_query_usage_p50"] = {
            k: float(np.percentile([u.get(k) or 0 for u in usages], 50))
            for k in ("prompt_tokens", "cached_tokens", "completion_tokens", "ttft_ms", "total_ms")
        }
        extra["warm_questions"] = len(warm)
    for budget in args.compare_answer_budgets or ():
        env = {**os.environ, "MEMSTAGE_ANSWER_BUDGET": str(budget)}
        other, other_usages, _ = warm_queries(args, home, questions, env)
        extra.setdefault("warm_by_answer_budget", {})[str(budget)] = {
            "warm_p50": round(float(np.percentile(other, 50)), 2),
            "prompt_tokens_p50": float(
                np.percentile([u.get("prompt_tokens") or 0 for u in other_usages], 50)
            ),
            "cached_tokens_p50": float(
                np.percentile([u.get("cached_tokens") or 0 for u in other_usages], 50)
            ),
        }
    if args.prefect:
        prefect, env = start_prefect(home.parent)
        try:
            warm, _, _ = warm_queries(args, home, questions, env)
            walls["warm_p50_prefect"] = float(np.percentile(warm, 50))
            time.sleep(5)  # the service records each run after answering; the last one may still be going
            extra["prefect_query_flow_runs"] = query_flow_runs(env["PREFECT_API_URL"])
        finally:
            os.killpg(prefect.pid, signal.SIGTERM)
            prefect.wait(60)
    return {k: round(v, 2) for k, v in walls.items()}, extra


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/locomo/locomo-dev.json")
    ap.add_argument("--conversation", default="conv-26")
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--warm-questions", type=int, default=10, help="new-process queries through the service")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--prefect", action="store_true", help="also warm queries reporting to a Prefect server")
    ap.add_argument(
        "--compare-answer-budgets", type=int, nargs="*", default=None, metavar="TOKENS",
        help="also warm queries with these MEMSTAGE_ANSWER_BUDGET values (a `memstage serve` each)",
    )  # fmt: skip
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
    result["load_average_1m_at_start"] = round(os.getloadavg()[0], 2)  # the machine's other work
    result["load_averages_at_start"] = [round(x, 2) for x in os.getloadavg()]
    from memstage.settings import get_settings

    result["answer_budget"] = get_settings().answer_budget
    result["threads"] = get_settings().threads
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

        result["new_process_query_s"], usage = new_process_queries(args, home, questions)
        if usage:
            result["second_query_usage"] = usage.pop("second", None)
            result.update(usage)
    result["load_averages_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))
    if not args.json:
        a, b = result["retrieve_ms_actor"], result["retrieve_ms_in_process"]
        print(
            f"\n{'retrieval (ms)':<24}{'p50':>8}{'p95':>8}\n{'via Ray actor':<24}{a['p50']:>8}{a['p95']:>8}\n"
            f"{'in process':<24}{b['p50']:>8}{b['p95']:>8}\n"
            f"`memstage query` in a new process: cold {result['new_process_query_s'].get('cold')} s, "
            f"warm p50 {result['new_process_query_s'].get('warm_p50')} s (through `memstage serve`)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
