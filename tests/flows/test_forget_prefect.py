"""A hard forget reaches everywhere memstage wrote: the data directory and the Prefect database.

Through the command line, with PREFECT_HOME a fresh folder (so its temporary Prefect server keeps
prefect.db there): ingest turns about a subject (one quarantined with an invalid namespace `fz/x`,
one with a bad time that quotes the subject: no byte of it reaches Prefect by default), ingest more
with MEMSTAGE_ARTIFACT_TEXT=1 (so Prefect holds an artifact quoting it, which the forget must delete),
retrieve with the subject in the question, then `forget --hard --subject`; afterwards neither folder
holds one byte of the subject.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memstage.stores.compact import find_bytes

SUBJECT = "Quetzalcoatlus"
CLI = [sys.executable, "-c", "import sys; from memstage.cli.main import main; sys.exit(main())"]

pytestmark = pytest.mark.slow  # five CLI runs, each with its own temporary Prefect server (~2-4 min)


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, env=env, timeout=600)


def test_hard_forget_leaves_no_byte_in_the_data_directory_or_prefect(tmp_path):
    home, prefect_home = tmp_path / "home", tmp_path / "prefect"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MEMSTAGE_ARTIFACT_TEXT")}
    env["PREFECT_HOME"] = str(prefect_home)
    turns = [
        {
            "namespace": "fz",
            "session": "s1",
            "speaker": "Ann",
            "text": f"I saw a {SUBJECT} skeleton at the museum.",
        },
        {"namespace": "fz", "session": "s1", "speaker": "Ben", "text": "The museum cafe had great coffee."},
        {"namespace": "fz/x", "session": "s1", "speaker": "Ann", "text": f"{SUBJECT} wingspan was huge."},
        {"namespace": "fz", "session": "s1", "speaker": "Ann", "text": "hello", "time": f"{SUBJECT} o'clock"},
        {"namespace": "other", "session": "s1", "speaker": "Cy", "text": "My dog Pepper likes the park."},
    ]
    path = tmp_path / "turns.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in turns))
    common = ["--home", str(home), "--runner", "local", "--json"]

    ingested = run(["ingest", str(path), *common], env)
    assert ingested.returncode == 3, ingested.stderr[-3000:]  # two records quarantined
    assert json.loads(ingested.stdout)["quarantined"] == 2
    assert find_bytes(prefect_home, SUBJECT) == []  # by default no text reaches Prefect, reasons included
    # the operator opts in: this run's artifact lists the quarantine reasons, one quoting the subject
    more = tmp_path / "more.jsonl"
    more.write_text(
        json.dumps({"namespace": "fz", "speaker": "Ann", "text": f"The {SUBJECT} had a long beak."}) + "\n"
        + json.dumps({"namespace": "fz", "text": "bye", "time": f"after {SUBJECT} time"}) + "\n"
    )  # fmt: skip
    opted_in = run(["ingest", str(more), *common], {**env, "MEMSTAGE_ARTIFACT_TEXT": "1"})
    assert opted_in.returncode == 3, opted_in.stderr[-3000:]
    assert find_bytes(prefect_home, SUBJECT), "the opted-in run should have put text into Prefect"
    question = f"What did Ann see about the {SUBJECT}?"
    assert run(["retrieve", question, "--namespace", "fz", *common], env).returncode == 0

    forgot = run(["forget", "--namespace", "fz", "--subject", SUBJECT, "--hard", *common], env)
    assert forgot.returncode == 0, forgot.stdout[-3000:] + forgot.stderr[-3000:]
    report = json.loads(forgot.stdout)
    assert report["subject_remains"] is False and report["files_still_containing_subject"] == []
    assert report["quarantine_deleted"] == 3  # the `fz/x` row and the two bad-time rows
    assert (
        report["prefect"]["artifacts_deleted"] >= 1
        and report["prefect"]["database_files_holding_subject"] == []
    )
    print(json.dumps(report["prefect"]))

    left = {"data directory": find_bytes(home, SUBJECT), "prefect home": find_bytes(prefect_home, SUBJECT)}
    assert left == {"data directory": [], "prefect home": []}, left
    assert Path(prefect_home / "prefect.db").exists()  # the database that was searched is there
    other = run(["retrieve", "Who likes the park?", "--namespace", "other", *common], env)
    assert other.returncode == 0 and "Pepper" in other.stdout  # other tenants untouched
