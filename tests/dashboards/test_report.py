"""`memstage report`: every plot drawn from a store with history, and the page rendered by headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from memstage.stores.schema import RUNS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def add_history(store, days: int = 5) -> None:
    """A week of nightly runs as the stage flows, eval and a query server would record them."""
    start = datetime(2026, 11, 1, 2, 0, tzinfo=UTC)
    rows = []
    for d in range(days):
        at = start + timedelta(days=d)
        figures = {
            "ingest": {"records": 19},
            "compress": {"level0_ratio": round(0.9 - 0.05 * d, 3), "tokens_before": 400, "tokens_after": 300},
            "consolidate": {"merged": d},
            "update": {"superseded": 1},
            "index": {"embedded": 19},
            "forget": {"archived": d % 3, "ttl_hard_deleted": int(d == 4)},
            "eval": {
                "recall": {"250": 0.5 + 0.01 * d, "500": 0.6 + 0.01 * d, "1000": 0.72, "2000": 0.82},
                "by_category": {
                    "1000": {"multi-hop": 0.6, "temporal": 0.7, "open-domain": 0.5, "single-hop": 0.8}
                },
            },
            "query": {"kv_cache": {"hit_token_share": min(0.9, 0.3 + 0.15 * d)}},
        }
        for i, (stage, figs) in enumerate(figures.items()):
            rows.append(
                {
                    "run_id": f"r{d}-{stage}",
                    "flow_run_id": f"f{d}",
                    "stage": stage,
                    "namespace": "locomo:dev" if stage == "eval" else "demo",
                    "started_at": at + timedelta(minutes=i),
                    "duration_s": 0.5 + i + d * 0.1,
                    "changed": 3,
                    "figures": json.dumps(figs),
                    "status": "failed" if (stage == "update" and d == 2) else "ok",
                }
            )
    with store.writer() as w:
        w.insert("runs", pa.Table.from_pylist(rows, schema=RUNS))


@pytest.fixture
def report_store(indexed_sample):
    add_history(indexed_sample)
    return indexed_sample


def test_report_draws_every_plot(report_store, tmp_path):
    from memstage.dashboards.report import write_report

    out = write_report(report_store, tmp_path / "report.html", namespace="demo")
    page = Path(out["out"]).read_text()
    assert out["plots"] == 7 and page.count("<svg") == 7
    assert "No data yet" not in page  # memories, durations, compression, forget, recall, KV cache
    for fetch in ('src="http', 'href="http', "url(http", "<script", "<link"):
        assert fetch not in page  # self-contained: nothing to load from anywhere
    for title in ("Memories over time", "Stage durations", "Compression", "Forgotten", "recall", "KV cache"):
        assert title in page
    assert "Instruction-like memories" in page and "nothing is quoted with a warning" in page  # none flagged


def test_report_on_empty_store_says_what_is_missing(store, tmp_path):
    from memstage.cli.main import main

    assert main(["report", "--home", str(store.home), "--out", str(tmp_path / "r.html"), "--json"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert page.count("<svg") == 7 and page.count("No data yet") == 7
    assert "memstage ingest FILE" in page


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium; CI installs it)"
)
def test_report_renders_in_headless_chromium(report_store, tmp_path):
    from PIL import Image

    from memstage.dashboards.report import write_report

    html = Path(write_report(report_store, tmp_path / "report.html")["out"])
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--window-size=1280,1500",
            f"--screenshot={shot}",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists(), done.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 1500)
    colours = img.resize((320, 375)).getcolors(maxcolors=1 << 20)  # [(count, rgb), ...]
    total = sum(n for n, _ in colours)
    drawn = 1 - max(n for n, _ in colours) / total  # share of pixels that are not the background
    assert drawn > 0.05, f"screenshot is nearly blank ({drawn:.1%} drawn)"
    assert len(colours) > 100  # lines, bars and text in several colours, not a flat page
