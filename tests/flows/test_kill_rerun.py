"""A stage killed (SIGKILL, in a subprocess) in the middle of its commit, then run again, leaves the
store exactly as a clean run does (table contents compared minus timestamps and op ids)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stage_data import ALICE, load, table_contents

from memstage.stores.store import MemoryStore
from memstage.tasks.compress import run_compress
from memstage.tasks.consolidate import run_consolidate

TESTS = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from memstage.stores import store as st

marker = Path({marker!r})
original = st.Writer.insert

def insert_then_hang(self, table, rows, **kw):
    n = original(self, table, rows, **kw)
    if table == "memories":  # the stage's rows are written, its ops not yet: the transaction is open
        marker.write_text("in transaction")
        time.sleep(600)
    return n

st.Writer.insert = insert_then_hang
store = st.MemoryStore({home!r})
if {stage!r} == "compress":
    from memstage.gpu.tokenizer import TokenCounter
    from memstage.tasks.compress import run_compress
    run_compress(store, "alice", count_tokens=TokenCounter(store.models_dir()).count_many)
else:
    from memstage.gpu.encoder import Encoder
    from memstage.gpu.tokenizer import TokenCounter
    from memstage.tasks.consolidate import run_consolidate
    run_consolidate(store, "alice", embed=Encoder(device="cpu").encode,
                    count_tokens=TokenCounter(store.models_dir()).count_many)
"""


def run_and_kill(home: Path, stage: str, tmp_path: Path) -> None:
    marker = tmp_path / f"{stage}.marker"
    code = CHILD.format(tests=str(TESTS), marker=str(marker), home=str(home), stage=stage)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=TESTS.parent, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the {stage} subprocess exited ({proc.returncode}) before reaching its commit")
            if time.monotonic() > deadline:
                pytest.fail(f"the {stage} subprocess never reached its commit")
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("stage", ["compress", "consolidate"])
def test_killed_stage_then_rerun_equals_clean_run(stage, store, encoder, token_counter, tmp_path):
    load(store, "alice", ALICE, token_counter.count_many)
    if stage == "consolidate":
        run_compress(store, "alice", count_tokens=token_counter.count_many)
    clean_home = tmp_path / "clean"
    shutil.copytree(store.home, clean_home)
    initial = table_contents(store)

    def run(s: MemoryStore):
        if stage == "compress":
            return run_compress(s, "alice", count_tokens=token_counter.count_many)
        return run_consolidate(s, "alice", embed=encoder.encode, count_tokens=token_counter.count_many)

    clean = MemoryStore(clean_home)
    assert run(clean).changed > 0

    run_and_kill(store.home, stage, tmp_path)
    killed = table_contents(store)
    if stage == "compress":  # its one transaction was rolled back: nothing of it is stored
        assert killed == initial
    else:  # only the derived embeddings (committed before the stage's transaction) may be there
        assert killed["ops"] == initial["ops"] and killed["events"] == initial["events"]
        texts = lambda t: sorted((m["id"], m["text"], m["status"], m["parent"]) for m in t["memories"])  # noqa: E731
        assert texts(killed) == texts(initial)
    rerun = run(store)
    assert rerun.changed > 0
    assert table_contents(store) == table_contents(clean)
    assert run(store).changed == 0
