"""Ingest throughput: turns/s through the whole ingest flow (Prefect + Ray) against the bare encoder.

The encoder is the real cost of ingest; orchestration must not be. All are measured in this run on
the same texts, alternately for --rounds rounds (the machine is shared and its speed drifts by 20%
within minutes). The bare rates are measured before the first round and after every round, and each
round's flow is compared with the mean of the two that bracket it (so a drift of the machine's speed
during the round cancels out). What is measured:
  * bare encoder, one process: the model in this process, all cores as torch threads, calls of
    1024 texts (how a library user would call it), or on a GPU host calls of the flow's chunk size
    (CHUNK["actor"], or MEMSTAGE_ENCODER_CHUNK), so both feed the same `Encoder` the same way; on a
    GPU also the same calls on texts tokenised beforehand (gpu/encoder.tokenise, not timed), the
    encoder's bound when the flow's worker pool tokenises for it (MEMSTAGE_ENCODER_PRETOKENISE);
  * bare encoder, data-parallel: one single-threaded model per core in a multiprocessing pool,
    pulling the flow's own chunks (the layout the flow uses on CPU, without Prefect, Ray or the store);
  * the whole ingest flow with its runtime warm (Prefect server, Ray, workers holding their models,
    started by a first ingest of the same file whose time is reported as the cold start), under a
    new namespace prefix so all of its turns are new.
The ratio is the median over rounds of flow rate / the faster bare rate of that round. Where the
flow's time goes: the CPU seconds each role's processes spent during the flow (this process is the
driver: parsing, the store, the indexes, Prefect's and Ray's clients), from psutil.

    python bench/ingest_throughput.py --data ../shared/data/locomo/locomo-dev.json [--rounds 2] [--json]

On a GPU host the flow encodes in the services actor on the card (`embedding_slots`: "actor"), and
the bare encoder is the same `Encoder` on the card in this process, called with the flow's chunk
size. The flow's per-turn CPU work runs on its worker pool (MEMSTAGE_SCAN_WORKERS processes,
default all CPUs but two); its CPU is reported as "worker_pool". --replicate N ingests N copies of
each conversation (each its own namespace) so that the run is not dominated by start-up:
    python bench/ingest_throughput.py --replicate 100 --out bench/results/ingest_gpu_h200.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bare_encoder_rate(enc: Any, texts: list[str], call: int = 1024) -> float:
    """Texts/s of `enc.encode` called on `call` texts at a time (on a GPU: the flow's chunk size)."""
    enc.encode(texts[:64])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(texts), call):
        enc.encode(texts[i : i + call])
    return len(texts) / (time.perf_counter() - start)


def bare_pretokenised_rate(enc: Any, texts: list[str], call: int) -> float:
    """Texts/s of `enc.encode` on `call`-text chunks tokenised beforehand (not timed): padding and model."""
    from memstage.gpu.encoder import tokenise

    chunks = [tokenise(texts[i : i + call]) for i in range(0, len(texts), call)]
    enc.encode(chunks[0])  # warm-up
    start = time.perf_counter()
    for chunk in chunks:
        enc.encode(chunk)
    return len(texts) / (time.perf_counter() - start)


_pool_encoder: Any = None


def _load_single_threaded() -> None:
    global _pool_encoder
    import torch

    from memstage.gpu.encoder import Encoder

    torch.set_num_threads(1)
    _pool_encoder = Encoder(device="cpu")
    _pool_encoder.encode(["warm-up"] * 64)


def _pool_encode(texts: list[str]) -> Any:
    return _pool_encoder.encode(texts)


def data_parallel_rate(pool: Any, texts_by_namespace: dict[str, list[str]], size: int) -> float:
    from memstage.runtime.encoder_pool import chunked

    chunks = [part for texts in texts_by_namespace.values() for _, part in chunked(texts, texts, size)]
    start = time.perf_counter()
    for _ in pool.imap_unordered(_pool_encode, chunks, chunksize=1):
        pass
    return sum(map(len, chunks)) / (time.perf_counter() - start)


ROLES = (  # (role, substring of the process's command line), first match wins
    ("broker", "ray::ChunkBroker"),
    ("prefect_server", "uvicorn"),
    ("ray_system", "raylet"), ("ray_system", "gcs_server"), ("ray_system", "ray/dashboard"),
    ("ray_system", "ray/autoscaler"), ("ray_system", "log_monitor"), ("ray_system", "Agent"),
    ("encoder_workers", "ray::"),
    # the flow's worker pool (tasks/workers.py: flags, token counts, level-0 rows, index files) and,
    # on a CPU host, this bench's data-parallel pool: both are multiprocessing children
    ("worker_pool", "multiprocessing"),
)  # fmt: skip


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far) of this process and its descendants."""
    try:
        import psutil
    except ImportError:
        return {}
    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times, cmdline = proc.cpu_times(), " ".join(proc.cmdline())
        except psutil.Error:
            continue
        role = "driver" if proc.pid == me.pid else next((r for r, key in ROLES if key in cmdline), "other")
        out[proc.pid] = (role, times.user + times.system)
    return out


def cpu_spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds by role between two snapshots, largest first (processes gone by `after` not counted)."""
    spent: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        spent[role] = spent.get(role, 0.0) + cpu - before.get(pid, (role, 0.0))[1]
    return {role: round(v, 2) for role, v in sorted(spent.items(), key=lambda kv: -kv[1])}


def where_time_went(out: dict[str, Any], flow_s: float) -> dict[str, Any]:
    """The flow's phases (seconds of its thread, runtime/phases.py) and each encoder's busy seconds
    and utilisation (busy / the flow's wall as this bench timed it), from the ingest's result."""
    encoders = [
        {**r, "utilisation": round(r["busy_s"] / flow_s, 3) if flow_s else None}
        for r in out.get("encoders", [])
    ]
    return {"phases_s": out.get("phases", {}), "encoders": encoders}


def time_table(went: dict[str, Any]) -> str:
    """A short table of one round's phases and encoders, for stderr."""
    lines = [f"  {name:<22}{s:>9.2f} s" for name, s in went["phases_s"].items()]
    for r in went["encoders"]:
        timings = ", ".join(f"{k} {v}" for k, v in r["encoder"].items() if k.endswith("_s"))
        lines.append(
            f"  encoder {r['slot']}: {r['texts']} texts, busy {r['busy_s']:.2f} s, "
            f"utilisation {r['utilisation']}  ({timings})"
        )
    return "\n".join(lines)


def replicate(data: Path, copies: int, folder: Path) -> Path:
    """A LoCoMo file holding `copies` of each conversation, each copy its own sample (namespace)."""
    if copies <= 1:
        return data
    samples = json.loads(data.read_text())
    out = [{**s, "sample_id": f"{s['sample_id']}-r{k}"} for k in range(copies) for s in samples]
    path = folder / f"{data.stem}-x{copies}.json"
    path.write_text(json.dumps(out))
    return path


def machine() -> str:
    import os
    import platform

    import torch

    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{platform.node() or 'host'}: {os.cpu_count()} CPUs{gpu}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/locomo/locomo-dev.json")
    ap.add_argument("--runner", default="ray", choices=["ray", "local"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print only the JSON object on stdout")
    ap.add_argument("--replicate", type=int, default=1, help="copies of each conversation (namespaces)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    from memstage.settings import apply_process_defaults

    # as every memstage process has them (the flow's Ray workers too): above all TOKENIZERS_PARALLELISM
    # off, since the encoder tokenises on its own thread pool. With Rust's own threads on top, the bare
    # encoder tokenised 52k texts/s on the H200 against 81k/s without (encoder_probe_h200.json).
    apply_process_defaults()
    if not args.data.exists():
        print(json.dumps({"skipped": f"no data at {args.data}"}))
        return 0

    from memstage.flows.ingest import run_ingest
    from memstage.runtime.backends import RuntimeConfig
    from memstage.tasks.index import level0_text
    from memstage.tasks.ingest import parse_file

    tmp_data = tempfile.TemporaryDirectory()
    data = replicate(args.data, args.replicate, Path(tmp_data.name))
    events, _ = parse_file(data, "locomo")
    texts, by_namespace = [], {}
    for e in events.to_pylist():
        texts.append(level0_text(e["speaker"], e["text"], json.loads(e["metadata"])))
        by_namespace.setdefault(e["namespace"], []).append(texts[-1])

    from memstage.gpu.encoder import Encoder
    from memstage.runtime.encoder_pool import CHUNK
    from memstage.runtime.services import embedding_slots
    from memstage.settings import get_settings

    encoder = Encoder()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        config = RuntimeConfig(home=Path(tmp) / "home", runner=args.runner)
        t0 = time.perf_counter()
        run_ingest(args.data, "locomo", "warmup", config, show_progress=False)
        cold_start_s = time.perf_counter() - t0
        print(
            f"cold start (warm-up ingest of {args.data.name}): {cold_start_s:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        where, slots = embedding_slots(args.runner == "ray")
        chunk = get_settings().encoder_chunk or CHUNK[where]  # the flow's chunk size
        pool = None
        if where == "workers" and encoder.device == "cpu":
            pool = multiprocessing.get_context("spawn").Pool(slots, initializer=_load_single_threaded)
            pool.map(abs, range(slots))  # wait until every process has its model
        try:

            def bare_rates() -> tuple[float, float | None]:
                one = bare_encoder_rate(encoder, texts, chunk if where == "actor" else 1024)
                return one, (data_parallel_rate(pool, by_namespace, chunk) if pool else None)

            before = bare_rates()
            for r in range(args.rounds):
                cpu_before, t0 = cpu_by_process(), time.perf_counter()
                out = run_ingest(data, "locomo", f"round{r}", config, show_progress=False)
                flow_s = time.perf_counter() - t0
                cpu = cpu_spent(cpu_before, cpu_by_process())
                after = bare_rates()
                # The bare rates bracketing the flow, averaged: cancels the machine's drift over the round.
                bare = (before[0] + after[0]) / 2
                parallel = (before[1] + after[1]) / 2 if pool else None
                before = after
                flow = out["events_new"] / flow_s
                best = max(bare, parallel or 0.0)
                rounds.append({"encoder_turns_per_s": round(bare, 1),
                               "data_parallel_turns_per_s": round(parallel, 1) if parallel else None,
                               "flow_turns_per_s": round(flow, 1), "flow_s": round(flow_s, 2),
                               "ratio": round(flow / best, 3), "ratio_to_one_process": round(flow / bare, 3),
                               "flow_cpu_s": cpu, **where_time_went(out, flow_s)})  # fmt: skip
                print(f"round {r}: {json.dumps(rounds[-1])}", file=sys.stderr, flush=True)
                print(time_table(rounds[-1]), file=sys.stderr, flush=True)
            pretokenised = bare_pretokenised_rate(encoder, texts, chunk) if where == "actor" else None
        finally:
            if pool:
                pool.terminate()

    def median(key: str) -> float | None:
        values = [r[key] for r in rounds if r[key] is not None]
        return round(statistics.median(values), 3) if values else None

    def median_of(role: str) -> float:
        return round(statistics.median(r["flow_cpu_s"].get(role, 0.0) for r in rounds), 2)

    bare, flow_rate, ratio = median("encoder_turns_per_s"), median("flow_turns_per_s"), median("ratio")
    parallel = median("data_parallel_turns_per_s")
    result = {
        "turns": out["events_new"],
        "runner": out["runner"],
        "encoder_turns_per_s": bare,
        "data_parallel_turns_per_s": parallel,
        "encoding": f"{where}: {slots} at once",
        "chunk": chunk,
        "pretokenise": where == "actor" and get_settings().encoder_pretokenise,
        # the same encoder on chunks tokenised beforehand (after the rounds): its padding and model alone
        "encoder_pretokenised_turns_per_s": round(pretokenised, 1) if pretokenised else None,
        "flow_turns_per_s": flow_rate,
        "ratio_flow_to_encoder": ratio,
        "ratio_flow_to_one_process_encoder": median("ratio_to_one_process"),
        "flow_cpu_s": {role: median_of(role) for role in rounds[-1]["flow_cpu_s"]},
        # the flow thread's phases and each encoder's utilisation, per round (runtime/phases.py)
        "encoder_utilisation": [[e["utilisation"] for e in r["encoders"]] for r in rounds],
        "rounds": rounds,
        "cold_start_s": round(cold_start_s, 2),
        "device": encoder.device,
        "namespaces": len(by_namespace),
        "machine": machine(),
        "load_average": [round(x, 2) for x in __import__("os").getloadavg()],
        "command": "python " + " ".join(sys.argv),
    }
    tmp_data.cleanup()
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    if not args.json:
        print(
            f"\n{'measure':<34}{'value':>12}\n{'bare encoder, one process (turns/s)':<34}{bare:>12.1f}\n"
            f"{'bare encoder, data-parallel':<34}{parallel or float('nan'):>12.1f}\n"
            f"{'bare encoder, pre-tokenised':<34}{result['encoder_pretokenised_turns_per_s'] or float('nan'):>12.1f}\n"
            f"{'whole flow (turns/s)':<34}{flow_rate:>12.1f}\n"
            f"{'ratio flow / faster bare':<34}{ratio:>12.3f}\n{'cold start (s)':<34}{cold_start_s:>12.1f}\n"
            + "".join(
                f"{'CPU s during flow: ' + role:<34}{v:>12.2f}\n" for role, v in result["flow_cpu_s"].items()
            ),
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
