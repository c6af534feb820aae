"""Access counts under load: concurrent queries to `memstage serve` while another process holds the
store's writer lock all succeed, and once the lock is free every access is counted, exactly once.
Also the journal's own rules: a dead process's journal is merged, a re-merge counts nothing twice, a
malformed line is skipped. Real store, models, uvicorn, HTTP and a second process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import serve_in_thread

QUESTIONS = ["What is the name of Sam's dog?", "Where does Alex work?", "What did they cook?", "hiking"]


def _hold_writer_lock(home) -> subprocess.Popen:
    """Another process takes HOME's writer lock (as a maintenance commit does) and keeps it until its
    stdin closes."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from memstage.stores import writer_lock
        fd = writer_lock.acquire_file_lock(Path({str(home / "memstage.lock")!r}), 5, RuntimeError)
        print("held", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def served(indexed_sample, encoder, token_counter, monkeypatch):
    from memstage.runtime import services as services_mod
    from memstage.runtime.backends import RuntimeConfig
    from memstage.server.app import create_app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    home = indexed_sample.home
    svc = services_mod.services(RuntimeConfig(home=home, runner="local"), use_ray=False)
    svc._encoder, svc._counter = encoder, token_counter  # the session's models: no second load
    url, server = serve_in_thread(create_app(svc, flush_interval_s=0.2))  # no keys: loopback test only
    yield home, url.removesuffix("/v1"), server
    server.should_exit = True
    services_mod._local.pop(str(home), None)


def _query(base: str, question: str) -> list[str]:
    body = json.dumps({"question": question, "namespace": "demo", "answer": False}).encode()
    req = urllib.request.Request(
        base + "/memstage/query", body, {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return [m["memory_id"] for m in json.loads(r.read())["memories"]]


def _counts(store) -> dict[str, int]:
    rows = store.query("SELECT id, access_count FROM memories WHERE namespace = 'demo'").to_pylist()
    return {r["id"]: r["access_count"] or 0 for r in rows}


def test_concurrent_queries_while_the_writer_is_held_lose_no_access(served):
    from memstage.stores.access_log import journal
    from memstage.stores.store import MemoryStore

    home, base, server = served
    store = MemoryStore(home)
    before = _counts(store)
    holder = _hold_writer_lock(home)
    try:
        with ThreadPoolExecutor(8) as pool:
            used = list(pool.map(lambda i: _query(base, QUESTIONS[i % len(QUESTIONS)]), range(40)))
        time.sleep(0.5)  # a few flush attempts meet the busy store
        assert holder.poll() is None
        assert journal(home).pending() == 40  # all recorded in the journal, none merged yet
    finally:
        holder.stdin.close()
        holder.wait(30)
    deadline = time.monotonic() + 30
    while journal(home).pending() and time.monotonic() < deadline:
        time.sleep(0.1)  # the serving process's flusher merges once the lock is free
    assert journal(home).pending() == 0
    sent = Counter(i for ids in used for i in ids)
    after = _counts(store)
    assert sum(sent.values()) > 40
    assert {i: after[i] - before[i] for i in after if after[i] != before[i]} == dict(sent)
    runs = store.query("SELECT count(*) AS n FROM runs WHERE stage = 'query'").column("n")[0].as_py()
    assert runs == 40


def test_a_dead_process_journal_is_merged_once_and_bad_lines_skipped(indexed_sample):
    from memstage.stores import access_log
    from memstage.stores.store import MemoryStore

    home = indexed_sample.home
    ids = indexed_sample.memories("demo").column("id").to_pylist()[:2]
    code = textwrap.dedent(f"""
        from memstage.stores import access_log
        from memstage.stores.store import now_utc
        j = access_log.journal({str(home)!r})
        for n in range(3):
            run = {{"run_id": f"q{{n}}", "stage": "query", "namespace": "demo", "started_at": now_utc(),
                   "duration_s": 0.1, "changed": 0, "figures": "{{}}", "status": "ok"}}
            j.append("demo", {ids!r}, run)
    """)
    subprocess.run([sys.executable, "-c", code], check=True)  # exits without flushing: a dead journal
    [path] = (home / "accesses").glob("*.jsonl")
    with path.open("a") as f:
        f.write('{"namespace": "../etc", "ids": ["x"], "run": {"run_id": "evil"}}\n{"torn line\n')
    saved = path.read_bytes()
    assert access_log.flush_now(home) == 3
    counts = _counts(MemoryStore(home))
    assert [counts[i] for i in ids] == [3, 3]
    path.write_bytes(saved)  # as if the process died between the commit and the journal's removal
    assert access_log.flush_now(home) == 0
    assert [_counts(MemoryStore(home))[i] for i in ids] == [3, 3]
    assert not list((home / "accesses").glob("*.jsonl"))
