"""The injection detector's cost per text, with and without its pre-check, in the same run.

Every memory passes through `tasks.injection.scan` when ingest and index create it, so its cost is
paid per turn by the ingest driver. The pre-check (`tasks.injection_gate`: the strings each pattern
needs, found in one Aho-Corasick pass) skips the patterns a text cannot match; the reasons stay the
same (tests/tasks/test_injection_gate.py). Measured on LoCoMo dev turns (clean) and the attack
suite's 212 injection turns (bench/attack_suite.py), alternately for --rounds rounds, one thread.

    python bench/injection_scan.py --json --out bench/results/injection_scan_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
DATA = REPO.parent / "shared" / "data" / "locomo" / "locomo-dev.json"


def corpus(path: Path) -> dict[str, list[str]]:
    from attack_suite import make_cases

    data = json.loads(path.read_text())
    turns = [
        f"{t['speaker']}: {t['text']}"
        for conv in data
        for key, session in conv["conversation"].items()
        if key.startswith("session") and isinstance(session, list)
        for t in session
    ]
    return {"locomo_dev_turns": turns, "attack_suite": [c["injection"] for c in make_cases()]}


def per_text_us(scan, texts: list[str]) -> float:
    start = time.perf_counter()
    for text in texts:
        scan(text)
    return (time.perf_counter() - start) / len(texts) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from memstage.tasks import injection

    def ungated(text: str) -> list[str]:  # the detector before the pre-check, verbatim
        return [name for name, pattern in injection._CHECKS if pattern.search(text)]

    gated = injection._plain_reasons
    injection.scan("warm-up")  # builds the fold table and the automaton once
    report: dict = {"command": "python " + " ".join(sys.argv), "rounds": args.rounds, "sets": {}}
    for name, texts in corpus(args.data).items():
        plain = [injection.normalise(t) for t in texts]
        rows = {"ungated": [], "gated": []}
        for _ in range(args.rounds):
            rows["ungated"].append(per_text_us(ungated, plain))
            rows["gated"].append(per_text_us(gated, plain))
        same = all(gated(t) == ungated(t) for t in plain)
        full = per_text_us(injection.scan, texts)
        injection._plain_reasons = ungated  # the whole scan (normalise, decodings, rot13) as before
        full_before = per_text_us(injection.scan, texts)
        injection._plain_reasons = gated
        ug, g = statistics.median(rows["ungated"]), statistics.median(rows["gated"])
        report["sets"][name] = {
            "texts": len(texts),
            "patterns_us_per_text_ungated": round(ug, 1),
            "patterns_us_per_text_gated": round(g, 1),
            "speedup": round(ug / g, 2),
            "same_reasons": same,
            "scan_us_per_text": round(full, 1),
            "scan_us_per_text_ungated": round(full_before, 1),
        }
    report["machine"] = f"{platform.node()}: {os.cpu_count()} cpus, {platform.python_version()}"
    report["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report, indent=1))
    print(
        f"{'set':18s} {'texts':>6s} {'ungated us':>11s} {'gated us':>9s} {'x':>6s} same  scan before/after us",
        file=sys.stderr,
    )
    for name, r in report["sets"].items():
        print(
            f"{name:18s} {r['texts']:6d} {r['patterns_us_per_text_ungated']:11.1f} "
            f"{r['patterns_us_per_text_gated']:9.1f} {r['speedup']:6.2f} {r['same_reasons']!s:5s} "
            f"{r['scan_us_per_text_ungated']:.1f} / {r['scan_us_per_text']:.1f}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
