"""`memstage report`: one self-contained HTML page of plots about a store, read from its tables.

Every figure is matplotlib drawn to inline SVG (no network, no files beside the page). Sources:
memories over time per level and namespace from `memories.created_at`; stage durations,
compression ratio, forget counts, retrieval recall (stage 'eval') and KV cache hit rate (any run
whose figures carry `hit_token_share`/`kv_cache`) from the `runs` table. A plot with no data yet
says so, and which command would fill it, instead of disappearing.
"""

from __future__ import annotations

import html
import io
import re
import warnings
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from memstage.stores import queries  # noqa: E402
from memstage.stores.store import MemoryStore  # noqa: E402
from memstage.tasks.registry import STAGE_NAMES  # noqa: E402

# ingest, every registered stage in maintain order, then eval: one colour each (matplotlib's "tab10").
STAGE_COLOURS = dict(
    zip(["ingest", *STAGE_NAMES, "eval"], plt.get_cmap("tab10").colors, strict=False)  # type: ignore[attr-defined]
)
# Where a query was answered: warm (a running `memstage serve`), cold (the CLI loaded the models), or
# a Prefect deployment / flow run of its own.
QUERY_KINDS = (
    ("warm: memstage serve", "#55a868", ("serve",)),
    ("cold: in the CLI process", "#dd8452", ("cli",)),
    ("deployment / flow run", "#4c72b0", ("deployment", "flow")),
    ("chat: /v1/chat/completions", "#8172b3", ("chat",)),
)
FORGET_BARS = 24  # hourly forget runs: the last day's, not every bar since the store began
LEVEL_NAMES = {0: "raw turns (level 0)", 1: "sessions (level 1)", 2: "topics (level 2)"}


def _svg(fig: plt.Figure) -> str:
    buf = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # date locator on a range of seconds (a fresh store)
        fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg") :]  # drop the XML prolog and doctype: the page is HTML
    return re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)  # RDF boilerplate


def _figure(title: str) -> tuple[plt.Figure, Any]:
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=96)
    ax.set_title(title, loc="left", fontsize=11, fontweight="bold")
    ax.grid(alpha=0.25)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _time_axis(ax: Any, times: list[datetime] | None = None) -> None:
    """Dates on x, the axis fitted to the points (a 6% margin, at least 30 s each side): two minutes of
    runs fill the plot instead of sitting in the middle of a padded twenty-minute axis."""
    if times:
        lo, hi = min(times), max(times)
        pad = max((hi - lo) * 0.06, timedelta(seconds=30))
        ax.set_xlim(lo - pad, hi + pad)
    loc = mdates.AutoDateLocator(maxticks=6)
    ax.xaxis.set_major_locator(loc)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))


def _empty(title: str, hint: str, headline: str = "No data yet") -> str:
    """A panel that says why it is empty (and what would fill it) instead of an empty axis."""
    fig, ax = _figure(title)
    ax.axis("off")
    ax.text(0.5, 0.5, f"{headline}\n{hint}", ha="center", va="center", fontsize=11, color="#777")
    return _svg(fig)


def _runs(store: MemoryStore, namespace: str | None) -> list[dict[str, Any]]:
    return queries.runs(store, namespace)


def plot_memories(store: MemoryStore, namespace: str | None) -> str:
    """Cumulative memories created, one line per (namespace, level); archived ones drawn dashed."""
    rows = queries.memory_timeline(store, namespace)
    if not rows:
        return _empty("Memories over time", "memstage ingest FILE")
    fig, ax = _figure("Memories over time, per level and namespace")
    series: dict[tuple[str, int], list[datetime]] = defaultdict(list)
    for r in rows:
        series[(r["namespace"], r["level"])].append(r["created_at"])
    styles = ["-", "--", ":", "-."]
    namespaces = sorted({ns for ns, _ in series})
    now = datetime.now(UTC)
    for (ns, level), times in sorted(series.items()):
        label = LEVEL_NAMES.get(level, f"level {level}") + (f" · {ns}" if len(namespaces) > 1 else "")
        ax.step(
            [*times, now],  # the count holds until now: a flat line, not a lone vertical jump
            [*range(1, len(times) + 1), len(times)],
            where="post",
            label=label,
            color=f"C{level}",
            linestyle=styles[namespaces.index(ns) % len(styles)],
            linewidth=2,
        )
    first = min(r["created_at"] for r in rows)
    archived = sum(r["status"] != "active" for r in rows)
    ax.set_ylabel("memories created")
    ax.legend(fontsize=8, frameon=False)
    _time_axis(ax, [first, now])
    ax.annotate(
        f"{len(rows) - archived} active, {archived} archived",
        xy=(0.99, 0.02),
        xycoords="axes fraction",
        ha="right",
        fontsize=9,
        color="#555",
    )
    return _svg(fig)


def plot_durations(runs: list[dict[str, Any]]) -> str:
    """Seconds per stage run over time, one colour per stage; failed runs as red crosses."""
    if not runs:
        return _empty("Stage durations", "memstage maintain")
    fig, ax = _figure("Stage durations (seconds per run)")
    by_stage: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_stage[r["stage"]].append(r)
    for stage, rs in by_stage.items():
        ok = [r for r in rs if r["status"] == "ok"]
        ax.plot(
            [r["started_at"] for r in ok],
            [r["duration_s"] for r in ok],
            marker="o",
            markersize=4,
            label=stage,
            color=STAGE_COLOURS.get(stage),
        )
        bad = [r for r in rs if r["status"] != "ok"]
        if bad:
            ax.scatter(
                [r["started_at"] for r in bad], [r["duration_s"] for r in bad], marker="x", color="red", s=50
            )
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, frameon=False, ncol=2)
    _time_axis(ax, [r["started_at"] for r in runs])
    return _svg(fig)


def plot_compression(runs: list[dict[str, Any]]) -> str:
    """Level-0 tokens after / before compression, per namespace over time (lower is tighter)."""
    rs = [r for r in runs if r["stage"] == "compress" and r["status"] == "ok"]
    points = [(r, r["figures"].get("level0_ratio", r["figures"].get("ratio"))) for r in rs]
    points = [(r, v) for r, v in points if v is not None]
    if not points:
        return _empty("Compression ratio", "memstage run compress")
    fig, ax = _figure("Compression: tokens after / before (level 0)")
    by_ns: dict[str, list[tuple[datetime, float]]] = defaultdict(list)
    for r, v in points:
        by_ns[r["namespace"]].append((r["started_at"], float(v)))
    for ns, pts in sorted(by_ns.items()):
        ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=ns)
    ax.axhline(1.0, color="#999", linewidth=1, linestyle="--")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("ratio")
    ax.legend(fontsize=8, frameon=False)
    _time_axis(ax, [r["started_at"] for r, _ in points])
    return _svg(fig)


def plot_forget(runs: list[dict[str, Any]]) -> str:
    """Memories archived (and hard-deleted by TTL) per forget run, stacked bars per namespace."""
    rs = [r for r in runs if r["stage"] in ("forget", "forget-hard") and r["status"] == "ok"]
    if not rs:
        return _empty("Forgotten memories", "memstage run forget")
    archived = [int(r["figures"].get("archived", 0) or 0) for r in rs]
    deleted = [
        int(r["figures"].get("ttl_hard_deleted", 0) or 0)
        + (r["changed"] if r["stage"] == "forget-hard" else 0)
        for r in rs
    ]
    if not any(archived) and not any(deleted):
        return _empty(
            "Forgotten memories",
            f"{len(rs)} forget run(s) since {rs[0]['started_at']:%Y-%m-%d %H:%M} archived 0 memories:\n"
            "none was past its TTL, decayed below the threshold or over capacity",
            headline="Nothing forgotten",
        )
    shown = FORGET_BARS
    rs, archived, deleted = rs[-shown:], archived[-shown:], deleted[-shown:]  # the latest runs only
    fig, ax = _figure(
        f"Forgotten per run (latest {len(rs)})" if len(archived) == shown else "Forgotten per run"
    )
    xs = list(range(len(rs)))
    ax.bar(xs, archived, color="#937860", label="archived (undoable)")
    ax.bar(xs, deleted, bottom=archived, color="#c44e52", label="hard-deleted")
    ax.set_xticks(
        xs,
        [f"{r['started_at']:%m-%d %H:%M}\n{r['namespace']}" for r in rs],
        fontsize=7,
        rotation=0 if len(rs) < 6 else 45,
    )
    ax.set_ylabel("memories")
    ax.set_ylim(0, max(1, *(a + d for a, d in zip(archived, deleted, strict=True))) * 1.15)
    ax.legend(fontsize=8, frameon=False)
    return _svg(fig)


def plot_recall(runs: list[dict[str, Any]]) -> str:
    """Evidence recall per token budget across eval runs (the retrieval-quality history), per category."""
    rs = [r for r in runs if r["stage"] == "eval" and r["figures"].get("recall")]
    if not rs:
        return _empty("Retrieval recall", "memstage eval locomo FILE (recorded in this store)")
    fig, ax = _figure("Evidence recall by token budget, per eval run")
    budgets = sorted({b for r in rs for b in r["figures"]["recall"]}, key=int)
    for i, b in enumerate(budgets):
        pts = [(r["started_at"], r["figures"]["recall"][b]) for r in rs if b in r["figures"]["recall"]]
        ax.plot(
            [t for t, _ in pts],
            [v for _, v in pts],
            marker="o",
            color=plt.cm.viridis(i / max(len(budgets) - 1, 1)),
            label=f"{b} tokens",
        )
    for c in ("multi-hop", "temporal", "open-domain", "single-hop"):  # at 1000 tokens, where recorded
        pts = [(r["started_at"], (r["figures"].get("by_category") or {}).get("1000", {}).get(c)) for r in rs]
        if pts := [(t, v) for t, v in pts if v is not None]:
            ax.plot(*zip(*pts, strict=True), linestyle=":", marker=".", label=f"{c} @1000")
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall")
    ax.legend(fontsize=7, frameon=False, ncol=4)
    _time_axis(ax, [r["started_at"] for r in rs])
    return _svg(fig)


def _hit_rate(figures: dict[str, Any]) -> float | None:
    kv = figures.get("kv_cache") if isinstance(figures.get("kv_cache"), dict) else figures
    for key in ("hit_token_share", "kv_cache_hit_rate", "cache_hit_rate"):
        if isinstance(kv.get(key), int | float):
            return float(kv[key])
    return None


def plot_kv_cache(runs: list[dict[str, Any]]) -> str:
    """Share of prompt tokens served from the prefix KV cache, per run that reported it."""
    pts = [(r["started_at"], h, r["stage"]) for r in runs if (h := _hit_rate(r["figures"])) is not None]
    if not pts:
        return _empty(
            "KV cache hit rate", "recorded by every answered query (memstage query, serve, the query flow)"
        )
    fig, ax = _figure("KV cache: share of prompt tokens reused")
    ax.plot([t for t, _, _ in pts], [h for _, h, _ in pts], marker="o", color="#4c72b0")
    ax.fill_between([t for t, _, _ in pts], [h for _, h, _ in pts], alpha=0.15, color="#4c72b0")
    ax.set_ylim(0, 1)
    ax.set_ylabel("hit share")
    _time_axis(ax, [t for t, _, _ in pts])
    return _svg(fig)


def plot_queries(runs: list[dict[str, Any]]) -> str:
    """Seconds from question to answer per recorded query, coloured by where it was answered (warm
    service, cold CLI, deployment); hollow when it did not answer. Log scale when warm and cold mix."""
    rs = [r for r in runs if r["stage"] == "query" and r["status"] == "ok"]
    if not rs:
        return _empty("Queries", "memstage query QUESTION --namespace NS\n(or the memstage-query deployment)")
    fig, ax = _figure("Queries: seconds from question to answer")
    for label, colour, served in QUERY_KINDS:
        pts = [r for r in rs if (r["figures"].get("served_by") or "flow") in served]
        for hollow in (False, True):  # hollow: answered "I don't know" (or retrieval only)
            mine = [r for r in pts if (r["figures"].get("answered") is not True) == hollow]
            if mine:
                ax.scatter(
                    [r["started_at"] for r in mine], [r["duration_s"] for r in mine], s=30,
                    color=colour if not hollow else "none", edgecolors=colour,
                    label=f"{label} ({len(pts)})" if not hollow or len(mine) == len(pts) else None,
                )  # fmt: skip
    seconds = sorted(r["duration_s"] for r in rs)
    if seconds[-1] > 20 * max(seconds[0], 1e-3):
        ax.set_yscale("log")  # cold (seconds) and warm (under one) queries both readable
    else:
        ax.set_ylim(0, seconds[-1] * 1.15)
    ax.set_ylabel("seconds (hollow: did not answer)")
    ax.legend(fontsize=8, frameon=False)
    _time_axis(ax, [r["started_at"] for r in rs])
    ax.annotate(
        _query_summary(rs), xy=(0.99, 0.98), xycoords="axes fraction", ha="right", va="top",
        fontsize=9, color="#555",
    )  # fmt: skip
    return _svg(fig)


def _query_summary(rs: list[dict[str, Any]]) -> str:
    seconds = sorted(r["duration_s"] for r in rs)
    answers = [r["figures"]["answered"] for r in rs if "answered" in r["figures"]]
    prompt = sum(int(r["figures"].get("prompt_tokens") or 0) for r in rs)
    cached = sum(int(r["figures"].get("cached_tokens") or 0) for r in rs)
    parts = [f"{len(rs)} queries, median {seconds[len(seconds) // 2]:.2f} s"]
    if answers:
        parts.append(f"{sum(answers) / len(answers):.0%} answered")
    if prompt:
        parts.append(f"{cached / prompt:.0%} of prompt tokens cached")
    return " · ".join(parts)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>memstage report · {title}</title>
<style>
 body {{ font-family: system-ui, sans-serif; margin: 24px; background: #fafafa; color: #222; }}
 h1 {{ font-size: 22px; margin: 0 0 4px; }} .sub {{ color: #666; margin-bottom: 18px; }}
 .cards {{ display: flex; gap: 12px; margin-bottom: 18px; flex-wrap: wrap; }}
 .card {{ background: #fff; border-radius: 8px; padding: 10px 16px; box-shadow: 0 1px 3px #0002; }}
 .card b {{ display: block; font-size: 24px; }} .card span {{ color: #666; font-size: 12px; }}
 .grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 14px; }}
 .plot {{ background: #fff; border-radius: 8px; padding: 8px; box-shadow: 0 1px 3px #0002; }}
 .plot svg {{ width: 100%; height: auto; }}
</style></head><body>
<h1>memstage · {title}</h1><div class="sub">{home} · generated {when}</div>
<div class="cards">{cards}</div>
<div class="grid">{plots}</div>
</body></html>
"""


def flagged_panel(store: MemoryStore, namespace: str | None) -> str:
    """The memories the injection detector flagged (HTML-escaped text), or why the panel is empty."""
    rows = queries.flagged_memories(store, namespace, limit=15).to_pylist()
    title = "<h3>Instruction-like memories (flagged)</h3>"
    if not rows:
        return f"{title}<p class='sub'>No memory reads as an instruction: nothing is quoted with a warning or held out.</p>"
    body = "".join(
        f"<tr><td>{html.escape(r['namespace'])}</td><td>L{r['level']}</td><td>{html.escape(r['flag'])}</td>"
        f"<td>{html.escape((r['text'] or '')[:160])}</td></tr>"
        for r in rows
    )
    return (
        f"{title}<table><tr><th>namespace</th><th>level</th><th>why</th><th>text (quoted, never followed)</th></tr>"
        f"{body}</table>"
    )


def _cards(store: MemoryStore, namespace: str | None, runs: list[dict[str, Any]]) -> str:
    summary = queries.memory_summary(store, namespace)
    stage_runs = [r for r in runs if r["stage"] != "query"]
    asked = [r for r in runs if r["stage"] == "query" and r["status"] == "ok"]
    seconds = sorted(r["duration_s"] for r in asked)
    failed = sum(r["status"] != "ok" for r in stage_runs)
    last = max((r["started_at"] for r in stage_runs), default=None)
    cards = [
        (summary["active"], "active memories"),
        (summary["namespaces"], "namespaces"),
        (len(stage_runs), "stage runs"),
        (failed, "failed runs"),
        (store.counts(namespace).get("flagged", 0), "flagged instruction-like"),
        (f"{last:%Y-%m-%d %H:%M}" if last else "never", "last stage run (UTC)"),
        (len(asked), "queries"),
        (f"{seconds[len(seconds) // 2]:.2f} s" if seconds else "–", "median query"),
    ]
    return "".join(f"<div class='card'><b>{html.escape(str(v))}</b><span>{k}</span></div>" for v, k in cards)


def render_report(store: MemoryStore, *, namespace: str | None = None) -> str:
    """The page: every plot drawn from the store's tables (what `memstage serve` GET /report returns)."""
    return _page(store, namespace, _runs(store, namespace))


def _page(store: MemoryStore, namespace: str | None, runs: list[dict[str, Any]]) -> str:
    plots = [
        plot_memories(store, namespace),
        plot_queries(runs),
        plot_durations([r for r in runs if r["stage"] not in ("eval", "query")]),
        plot_compression(runs),
        plot_forget(runs),
        plot_recall(runs),
        plot_kv_cache(runs),
    ]
    return PAGE.format(
        title=html.escape(namespace or "all namespaces"),
        home=html.escape(str(store.home)),
        when=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        cards=_cards(store, namespace, runs),
        plots="".join(f"<div class='plot'>{p}</div>" for p in [*plots, flagged_panel(store, namespace)]),
    )


def write_report(store: MemoryStore, out: Path | str, *, namespace: str | None = None) -> dict[str, Any]:
    """Draw every plot and write the page; returns where it went and how many plots it holds."""
    runs = _runs(store, namespace)
    page = _page(store, namespace, runs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return {
        "out": str(out.resolve()),
        "plots": page.count("<svg"),
        "runs": len(runs),
        "bytes": out.stat().st_size,
    }
