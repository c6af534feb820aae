"""End to end through the CLI: real Prefect flow runs (temporary server) with the Ray task runner.

One process runs every command (Prefect's server and Ray start once), reading stdout as the user would.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import SAMPLE, run_json

from memstage.cli.main import main


@pytest.fixture(scope="module")
def one_conversation(tmp_path_factory, request):
    from conftest import LOCOMO

    if not LOCOMO.exists():
        pytest.skip(f"LoCoMo data not found at {LOCOMO}")
    samples = json.loads(LOCOMO.read_text())
    path = tmp_path_factory.mktemp("locomo") / "conv-26.json"
    path.write_text(json.dumps([s for s in samples if s["sample_id"] == "conv-26"]))
    return path


def test_ingest_retrieve_query_stats_through_prefect_and_ray(tmp_path, capfd, one_conversation):
    home = str(tmp_path / "home")
    ingested = run_json(
        capfd, "ingest", str(one_conversation), "--format", "locomo", "--home", home, "--runner", "ray"
    )
    assert ingested["runner"] == "ray" and ingested["namespaces"] == ["conv-26"]
    assert ingested["events_new"] == 419 and ingested["indexed"]["conv-26"]["embedded"] == 419
    sample = run_json(capfd, "ingest", str(SAMPLE), "--home", home, "--runner", "ray")
    assert sample["namespaces"] == ["demo"]
    again = run_json(capfd, "ingest", str(one_conversation), "--home", home, "--runner", "ray")
    assert again["events_new"] == 0 and again["indexed"]["conv-26"]["level0_created"] == 0

    got = run_json(
        capfd,
        "retrieve",
        "When did Caroline go to the LGBTQ support group?",
        "--namespace",
        "conv-26",
        "--home",
        home,
    )
    assert set(got) >= {"namespace", "question", "budget", "tokens", "memories"}
    assert got["tokens"] <= got["budget"] == 1000
    assert any("D1:3" in m["dia_ids"] for m in got["memories"])
    assert all(
        set(m) >= {"memory_id", "text", "score", "level", "event_ids", "dia_ids"} for m in got["memories"]
    )

    # namespace isolation: the sample's memories never answer for conv-26 and vice versa
    demo = run_json(
        capfd,
        "retrieve",
        "Where does Maya live now?",
        "--namespace",
        "demo",
        "--home",
        home,
        "--budget",
        "200",
    )
    assert demo["memories"] and all(m["dia_ids"] == [] for m in demo["memories"])

    answered = run_json(capfd, "query", "Where does Maya live now?", "--namespace", "demo", "--home", home)
    assert answered["answer"].strip()
    assert set(answered["usage"]) >= {"prompt_tokens", "cached_tokens", "ttft_ms", "total_ms"}

    stats = run_json(capfd, "stats", "--home", home)
    assert stats["namespaces"]["conv-26"]["events"] == 419 and stats["namespaces"]["demo"]["events"] == 19

    assert main(["retrieve", "anything", "--namespace", "nobody", "--home", home, "--json"]) == 2
    out, _ = capfd.readouterr()
    assert "has no memories" in json.loads(out)["error"]


def test_console_script_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "memstage.cli.main", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("ingest", "retrieve", "query", "stats", "demo"):
        assert command in out
