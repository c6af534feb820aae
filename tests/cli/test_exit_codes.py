"""`memstage ingest` exit codes: 0 all stored, 3 some quarantined, 2 user error (one line, no traceback,
before Prefect or Ray start), as documented in README.md and `memstage ingest --help`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

CLI = [sys.executable, "-c", "import sys; from memstage.cli.main import main; sys.exit(main())"]


def run_cli(*argv: str, home, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [*CLI, *argv, "--home", str(home)], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.parametrize(
    "make_args",
    [
        lambda d: [str(d / "missing.jsonl")],
        lambda d: [str(d)],  # a directory, format from the extension
        lambda d: [str(d), "--format", "jsonl"],  # a directory, format given
        lambda d: [str(d / "notes.txt")],  # an extension that names no format
        lambda d: [str(d / "notes.txt"), "--format", "parquet"],
        lambda d: [str(d / "notes.txt"), "--format", "locomo"],
        lambda d: [str(d / "ok.jsonl"), "--namespace", "bad/ns"],
    ],
)
def test_user_errors_exit_2_with_one_line_before_prefect_starts(tmp_path, make_args):
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "ok.jsonl").write_text('{"text": "hi"}\n')
    prefect_home = tmp_path / "prefect"
    start = time.perf_counter()
    proc = run_cli(
        "ingest", *make_args(tmp_path), home=tmp_path / "home", env_extra={"PREFECT_HOME": str(prefect_home)}
    )
    took = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("memstage ingest: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not prefect_home.exists(), "Prefect started before the input was checked"
    assert took < 30, f"{took:.1f} s: the error should come before Prefect or Ray start"


def test_quarantined_records_exit_3_and_all_stored_exit_0(tmp_path):
    good = [{"namespace": "ex", "text": f"turn {i}", "session": "s1"} for i in range(3)]
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps(r) + "\n" for r in good))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in good) + "not json\n" + '{"namespace": "ex"}\n')
    home = tmp_path / "home"
    proc = run_cli("ingest", str(mixed), "--runner", "local", "--json", home=home)
    assert proc.returncode == 3, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["quarantined"] == 2 and out["events_new"] == 3
    proc = run_cli("ingest", str(clean), "--runner", "local", "--json", home=home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["events_already_stored"] == 3


def test_ingest_help_documents_the_exit_codes():
    out = subprocess.run([*CLI, "ingest", "--help"], capture_output=True, text=True, check=True).stdout
    for code in ("0 ", "3 ", "2 ", "1 "):
        assert f"\n  {code}" in out
