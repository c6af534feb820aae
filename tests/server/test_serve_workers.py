"""`memstage serve --workers 2`: two real server processes on one port behind a supervisor, announced in
HOME/serve.json once both are warm; concurrent queries all answered; SIGINT stops every worker, and
every access is recorded (each worker merges its own journal on the way out). Real CLI, uvicorn,
models, store and HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

QUESTIONS = ["What is the name of Sam's dog?", "Where does Alex work?", "What did they cook?", "hiking"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(stat))
            except OSError:
                continue
    return out


def _stop(proc: subprocess.Popen, grace: float = 180) -> None:
    """SIGINT, as a user's Ctrl-C; the supervisor and its workers killed if it has not stopped within
    `grace` s (no worker outlives the test), and the test failed then. By pid: the workers run in
    sessions of their own, so a kill of the supervisor's process group would not reach them."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        for pid in [*_children(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(30)
        raise AssertionError(f"serve did not stop within {grace:.0f} s of SIGINT; it was killed") from None


def _ask(url: str, question: str) -> dict:
    body = json.dumps({"question": question, "namespace": "demo", "answer": False}).encode()
    req = urllib.request.Request(url + "/memstage/query", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_two_workers_share_the_port_and_record_every_access(indexed_sample):
    from memstage.stores.store import MemoryStore

    home = indexed_sample.home
    port = _free_port()
    env = {**os.environ, "MEMSTAGE_RUNNER": "local", "MEMSTAGE_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "memstage.cli.main", "serve", "--insecure-local", "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--home", str(home), "--workers", "2"], env=env)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while not (home / "serve.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "serve --workers 2 did not come up"
            time.sleep(0.5)
        info = json.loads((home / "serve.json").read_text())
        assert info["pid"] == proc.pid  # the supervisor announces, once both workers are warm
        workers = _children(proc.pid)
        assert len(workers) == 2
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda q: _ask(info["url"], q), QUESTIONS * 10))
        assert all(r["memories"] for r in replies)
        assert {r["served"]["pid"] for r in replies} <= set(workers)
        sent = sum(len(r["memories"]) for r in replies)
    finally:
        _stop(proc)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)  # every worker stopped
    assert not (home / "serve.json").exists()
    recorded = MemoryStore(home).query("SELECT sum(access_count) AS n FROM memories").column("n")[0].as_py()
    assert recorded == sent
