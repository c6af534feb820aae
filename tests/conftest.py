"""Shared fixtures: one encoder and one token counter per test session, a fresh store per test.

The generator's model is converted once per machine into a shared cache (MEMSTAGE_MODELS), not once
per temporary data directory, so tests that make many stores stay fast.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

os.environ.setdefault("MEMSTAGE_MODELS", str(Path.home() / ".cache" / "memstage-models"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a CUDA card, triton's kernels (gpu/triton_scoring.py) run on CPU tensors under its interpreter,
# which is chosen when a kernel is defined: before anything imports memstage.gpu.
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
LOCOMO = REPO.parent / "shared" / "data" / "locomo" / "locomo-dev.json"
SAMPLE = REPO / "cli" / "samples" / "sample_conversation.jsonl"


@pytest.fixture(autouse=True)
def fresh_settings():
    """memstage reads MEMSTAGE_* once per process; a test that sets one sees it (and leaves no trace)."""
    from memstage.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def encoder():
    from memstage.gpu.encoder import Encoder

    return Encoder(device="cpu")


@pytest.fixture(scope="session")
def token_counter():
    from memstage.gpu.tokenizer import TokenCounter

    return TokenCounter(Path(os.environ["MEMSTAGE_MODELS"]))


@pytest.fixture
def store(tmp_path):
    from memstage.stores.store import MemoryStore

    return MemoryStore(tmp_path / "home")


@pytest.fixture
def locomo_path() -> Path:
    if not LOCOMO.exists():
        pytest.skip(f"LoCoMo data not found at {LOCOMO}")
    return LOCOMO


@pytest.fixture
def indexed_sample(store, encoder, token_counter):
    """A store holding the bundled sample conversation (namespace 'demo'), ingested and indexed."""
    from memstage.tasks.index import run_index
    from memstage.tasks.ingest import commit_events, parse_file

    commit_events(store, *parse_file(SAMPLE, "jsonl"))
    run_index(store, "demo", embed=encoder.encode, count_tokens=token_counter.count_many)
    return store


def run_json(capfd, *argv: str) -> dict:
    """Run the CLI in-process with --json; stdout must hold exactly one JSON object."""
    import json

    from memstage.cli.main import main

    code = main([*argv, "--json"])
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, f"stdout must hold exactly one JSON object, got: {out[:500]}"
    return json.loads(lines[0])


def serve_in_thread(app) -> tuple[str, object]:
    """Start uvicorn on a free loopback port; returns (base_url, server)."""
    import socket
    import threading
    import time

    import uvicorn

    # the socket is bound here and handed to uvicorn: picking a free port, closing it and letting
    # uvicorn bind it later left a window in which a concurrent test run could take the same port
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", server


def indexed_turns(folder, turns: dict, encoder, token_counter):
    """A store under `folder` holding {namespace: [(session, time, speaker, text)]}, ingested and indexed."""
    import json

    from memstage.stores.store import MemoryStore
    from memstage.tasks.index import run_index
    from memstage.tasks.ingest import commit_events, parse_file

    path = folder / "turns.jsonl"
    path.write_text(
        "".join(
            json.dumps({"namespace": ns, "session": s, "time": t, "speaker": who, "text": text}) + "\n"
            for ns, rows in turns.items()
            for s, t, who, text in rows
        )
    )
    store = MemoryStore(folder / "home")
    commit_events(store, *parse_file(path, "jsonl"))
    for ns in turns:
        run_index(store, ns, embed=encoder.encode, count_tokens=token_counter.count_many)
    return store
