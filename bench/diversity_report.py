"""The markdown table of bench/session_diversity.py's result: the real path per file and packing, the
replayed re-orderings chosen leave-one-conversation-out, the spread's replayed curve, and where
today's packing leaves the evidence."""

from __future__ import annotations

from typing import Any

import numpy as np

BUDGETS_S = ("250", "500", "1000", "2000")
CATS = ("multi-hop", "temporal", "open-domain", "single-hop")
VARIANT_NAMES = ("speakers", "padded", "dated", "long", "assistant", "ontopic")


def cells(r: dict[str, Any]) -> str:
    cats = r["by_category"]["1000"]
    return (
        " | ".join(f"{r['recall'][b]:.4f}" for b in BUDGETS_S)
        + " | "
        + " | ".join(f"{cats.get(c, float('nan')):.3f}" for c in CATS)
        + f" | {r['latency_ms']['1000']['p95']:.1f} |"
    )


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Session-diverse packing (`{result['command']}`; {result['machine']}; start: {result['uptime_start']}; "
        f"end: {result.get('uptime_end', '-')}).",
        "",
        "Real path (`Retriever.retrieve`), recall per budget, per category at 1000, p95 ms at 1000 "
        "(`loco`: the spreads chosen leave-one-conversation-out on dev, "
        f"{sorted(set(result['replayed']['spread']['loco_choice'].values()))}; 0 is today's packing; "
        "`spread_X`: a fixed spread, shown for what the re-rank does, not chosen):",
        "",
        "| file | packing | " + " | ".join(BUDGETS_S) + " | " + " | ".join(CATS) + " | p95 |",
        "|" + " --- |" * (3 + len(BUDGETS_S) + len(CATS)),
    ]
    for name, per in result.get("real", {}).items():
        for k, v in per.items():
            if isinstance(v, dict) and "recall" in v:
                lines.append(f"| {name} | {k} | " + cells(v))
    lines += ["", "Replayed packing, each conversation at the parameter chosen on dev's other conversations "
              "(LOCO), minus today's order (recall at 250/500/1000/2000; multi-hop at 1000):", "",
              "| form | LOCO choices | on all dev | dev | dev multi-hop | variants' mean @1000 | "
              + " | ".join(VARIANT_NAMES) + " | kept |", "|" + " --- |" * (7 + len(VARIANT_NAMES))]  # fmt: skip
    for form, f in result["replayed"].items():
        per = f["files"]
        dev = per["dev"]
        mh = dev["loco"]["by_category_1000"]["multi-hop"] - dev["today"]["by_category_1000"]["multi-hop"]
        var = [per[n]["loco_minus_today"]["1000"] for n in VARIANT_NAMES if n in per]
        lines.append(
            f"| {form} | {sorted(set(map(str, f['loco_choice'].values())))} | {f['full_dev_choice']} | "
            + " ".join(f"{dev['loco_minus_today'][b]:+.4f}" for b in BUDGETS_S)
            + f" | {mh:+.4f} | {np.mean(var) if var else 0:+.4f} | "
            + " | ".join(
                f"{per[n]['loco_minus_today']['1000']:+.4f}" if n in per else "-" for n in VARIANT_NAMES
            )
            + f" | {f['kept_by_replay']} |"
        )
    spread = result["replayed"]["spread"]
    lines += ["", "Replayed recall@1000 along the spread's grid (every file; chosen on dev only):", "",
              "| file | " + " | ".join(str(g) for g in spread["grid"]) + " |",
              "|" + " --- |" * (1 + len(spread["grid"]))]  # fmt: skip
    for name, per in spread["files"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in per["curve_1000"]) + " |")
    lines += ["", "Today's packing at 1000 tokens: sessions and rows packed per question; missed evidence "
              "turns, their best rank, share in a session that has packed rows:", "",
              "| file | sessions | rows | " + " | ".join(f"{c} missed / rank / in packed" for c in CATS) + " |",
              "|" + " --- |" * (3 + len(CATS))]  # fmt: skip
    for name, d in result["diagnostics_today_1000"].items():
        m = d["missed"]
        lines.append(
            f"| {name} | {d['sessions_packed_mean']} | {d['rows_packed_mean']} | "
            + " | ".join(
                f"{m[c]['turns']} / {m[c]['median_rank']} / {m[c]['in_a_packed_session']}" for c in CATS
            )
            + " |"
        )
    lines += ["", f"kept (dev within 0.002 at every budget, multi-hop up, variants' mean not down, p95 < 50 ms): "
              f"{result.get('kept')}"]  # fmt: skip
    return "\n".join(lines) + "\n"
