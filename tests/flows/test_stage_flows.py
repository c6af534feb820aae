"""The stage flows through the CLI: `memstage run STAGE` (second run changes nothing), `maintain`,
`history`, `as-of`, and `forget --hard` (the subject is in no file under the data dir afterwards).

One process runs every command, on Prefect's temporary server with the in-process task runner
(`--runner local`); the Ray runner runs the same flows (see docs/stages.md for a run on LoCoMo).
"""

from __future__ import annotations

from pathlib import Path

from conftest import run_json
from stage_data import ALICE, write_jsonl

from memstage.stores.compact import find_bytes
from memstage.tasks.registry import STAGE_NAMES


def test_stage_commands_end_to_end(tmp_path: Path, capfd):
    home = str(tmp_path / "home")
    common = ["--home", home, "--runner", "local"]
    data = write_jsonl(tmp_path / "alice.jsonl", "alice", ALICE)
    run_json(capfd, "ingest", str(data), *common)

    first = run_json(capfd, "run", "compress", "--namespace", "alice", *common)
    assert first["stage"] == "compress" and first["namespace"] == "alice" and first["changed"] > 0
    assert first["tokens_after"] < first["tokens_before"]
    assert run_json(capfd, "run", "compress", "--namespace", "alice", *common)["changed"] == 0

    report = run_json(capfd, "maintain", "--namespace", "alice", *common)
    assert report["failed"] == []
    assert list(report["stages"]) == list(STAGE_NAMES)
    assert report["stages"]["update"]["changed"] >= 2
    again = run_json(capfd, "maintain", "--namespace", "alice", *common)
    assert all(s["changed"] == 0 for s in again["stages"].values()), again

    now = run_json(capfd, "as-of", "2023-10-01", "--namespace", "alice", "--grep", "Seattle", *common)
    seattle = now["memories"][0]
    june = run_json(capfd, "as-of", "2023-06-01", "--namespace", "alice", "--grep", "Boston", *common)
    assert june["count"] == 1 and "Boston" in june["memories"][0]["text"]
    history = run_json(capfd, "history", seattle["id"], *common)
    assert [v["version"] for v in history["versions"]] == [1, 2]

    assert find_bytes(Path(home), "Pixel")
    gone = run_json(capfd, "forget", "--namespace", "alice", "--subject", "Pixel", "--hard", *common)
    assert gone["undoable"] is False and gone["files_still_containing_subject"] == []
    assert find_bytes(Path(home), "Pixel") == []


def test_maintain_reports_a_failing_stage_and_runs_the_rest(tmp_path: Path, capfd, monkeypatch):
    import memstage.tasks.update

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("update is broken")

    monkeypatch.setattr(memstage.tasks.update, "run_update", broken)
    home = str(tmp_path / "home")
    common = ["--home", home, "--runner", "local"]
    run_json(capfd, "ingest", str(write_jsonl(tmp_path / "alice.jsonl", "alice", ALICE)), *common)
    report = run_json(capfd, "maintain", *common)
    assert report["failed"] == ["update"]
    assert "update is broken" in report["stages"]["update"]["error"]
    assert len(calls) >= 2  # retried
    assert report["stages"]["index"]["status"] == "ok" and report["stages"]["forget"]["status"] == "ok"
    assert report["stages"]["consolidate"]["changed"] > 0


def test_a_failing_namespace_is_retried_alone_and_reported_once(tmp_path: Path, capfd, monkeypatch):
    """Three namespaces, one whose compress always fails: its task runs twice (one retry), the
    others once each and their changes are committed; `runs` holds one row per namespace (the
    failed one as failed), not a second round from a retried flow run."""
    import memstage.tasks.compress
    from memstage.stores import queries
    from memstage.stores.store import MemoryStore

    real = memstage.tasks.compress.run_compress
    calls: list[str] = []

    def flaky(store, namespace, **kwargs):
        calls.append(namespace)
        if namespace == "bob":
            raise RuntimeError("bob's compress is broken")
        return real(store, namespace, **kwargs)

    monkeypatch.setattr(memstage.tasks.compress, "run_compress", flaky)
    home = str(tmp_path / "home")
    common = ["--home", home, "--runner", "local"]
    for ns in ("alice", "bob", "carol"):
        run_json(capfd, "ingest", str(write_jsonl(tmp_path / f"{ns}.jsonl", ns, ALICE)), *common)
    from memstage.cli.main import main

    assert main(["run", "compress", *common, "--json"]) != 0  # the stage reports its failure
    assert "bob's compress is broken" in capfd.readouterr().err
    assert sorted(calls) == ["alice", "bob", "bob", "carol"]
    store = MemoryStore(home)
    runs = [r for r in queries.runs(store, None) if r["stage"] == "compress"]
    assert sorted((r["namespace"], r["status"]) for r in runs) == [
        ("alice", "ok"),
        ("bob", "failed"),
        ("carol", "ok"),
    ]
    changed = {r["namespace"]: r["changed"] for r in runs}
    assert changed["alice"] > 0 and changed["carol"] > 0  # their changes committed despite bob
    compressed = store.query(
        "SELECT namespace, count(*) AS n FROM ops WHERE stage = 'compress' GROUP BY ALL ORDER BY ALL"
    ).to_pylist()
    assert [r["namespace"] for r in compressed] == ["alice", "carol"]
