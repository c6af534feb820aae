"""Ingest throughput: turns/s through the whole ingest flow (Prefect + Ray) against the bare encoder.

The encoder is the real cost of ingest; orchestration must not be. Both are measured in this run on
the same texts, alternately for --rounds rounds (the machine is shared and its speed drifts by 20%
within minutes): the bare encoder in this process, then the whole ingest flow with its runtime warm
(Prefect server, Ray, its workers and the encoder actor, started by a first ingest of the same file
whose time is reported as the cold start). Each round ingests under a new namespace prefix, so all
of its turns are new. The ratio is the median over rounds of flow rate / that round's encoder rate.

    python bench/ingest_throughput.py --data ../shared/data/locomo/locomo-dev.json [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bare_encoder_rate(enc: Any, texts: list[str]) -> float:
    enc.encode(texts[:64])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(texts), 1024):  # the flow's batch size
        enc.encode(texts[i : i + 1024])
    return len(texts) / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/locomo/locomo-dev.json")
    ap.add_argument("--runner", default="ray", choices=["ray", "local"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print only the JSON object on stdout")
    args = ap.parse_args()
    if not args.data.exists():
        print(json.dumps({"skipped": f"no data at {args.data}"}))
        return 0

    from flows.ingest_flow import run_ingest
    from flows.runtime import RuntimeConfig
    from tasks.index import level0_text
    from tasks.ingest import parse_file

    events, _ = parse_file(args.data, "locomo")
    texts = [level0_text(e["speaker"], e["text"], json.loads(e["metadata"])) for e in events.to_pylist()]

    from gpu.encoder import Encoder

    encoder = Encoder()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        config = RuntimeConfig(home=Path(tmp) / "home", runner=args.runner)
        t0 = time.perf_counter()
        run_ingest(args.data, "locomo", "warmup", config, show_progress=False)
        cold_start_s = time.perf_counter() - t0
        for r in range(args.rounds):
            bare = bare_encoder_rate(encoder, texts)
            t0 = time.perf_counter()
            out = run_ingest(args.data, "locomo", f"round{r}", config, show_progress=False)
            flow_s = time.perf_counter() - t0
            flow = out["events_new"] / flow_s
            rounds.append({"encoder_turns_per_s": round(bare, 1), "flow_turns_per_s": round(flow, 1),
                           "flow_s": round(flow_s, 2), "ratio": round(flow / bare, 3)})  # fmt: skip

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in rounds), 3)

    bare, flow_rate, ratio = median("encoder_turns_per_s"), median("flow_turns_per_s"), median("ratio")
    result = {
        "turns": out["events_new"],
        "runner": out["runner"],
        "encoder_turns_per_s": bare,
        "flow_turns_per_s": flow_rate,
        "ratio_flow_to_encoder": ratio,
        "rounds": rounds,
        "cold_start_s": round(cold_start_s, 2),
    }
    print(json.dumps(result))
    if not args.json:
        print(
            f"\n{'measure':<28}{'value':>12}\n{'bare encoder (turns/s)':<28}{bare:>12.1f}\n"
            f"{'whole flow (turns/s)':<28}{flow_rate:>12.1f}\n{'ratio flow/encoder':<28}{ratio:>12.3f}\n"
            f"{'cold start (s)':<28}{cold_start_s:>12.1f}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
