"""Two `memstage ingest` processes into one data directory at once: no duplicate `ops` rows, no re-embedding.

Both runs must succeed; afterwards every level-0 memory has exactly one `index/insert` ops row, and
the two runs together embedded each memory once (the second waits at the data directory's indexing
lock, then finds nothing left to embed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from memstage.stores.store import MemoryStore

CLI = [sys.executable, "-c", "import sys; from memstage.cli.main import main; sys.exit(main())"]

pytestmark = pytest.mark.slow  # two CLI processes, each with its own temporary Prefect server


def test_two_ingests_side_by_side_store_ops_and_embeddings_once(tmp_path, locomo_path):
    samples = json.loads(locomo_path.read_text())
    path = tmp_path / "conv-26.json"
    path.write_text(json.dumps([s for s in samples if s["sample_id"] == "conv-26"]))
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    argv = [*CLI, "ingest", str(path), "--home", str(home), "--runner", "local", "--json"]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in range(2)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err.decode()[-3000:]
        outs.append(json.loads(out))
    store = MemoryStore(home)
    memories = store.query("SELECT count(*) AS n FROM memories WHERE level = 0").column("n")[0].as_py()
    inserts = store.query(
        "SELECT count(*) AS n, count(DISTINCT memory_id) AS d FROM ops WHERE stage = 'index' AND action = 'insert'"
    ).to_pylist()[0]
    embedded = sum(o["indexed"]["conv-26"]["embedded"] for o in outs)
    print({"memories": memories, "ops_inserts": inserts, "embedded": embedded})
    assert memories == 419
    assert inserts == {"n": 419, "d": 419}, inserts
    assert embedded == 419, [o["indexed"] for o in outs]
    assert sorted(o["events_new"] for o in outs) == [0, 419]
