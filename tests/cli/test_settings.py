"""memstage.settings: every MEMSTAGE_* variable read in one place, and each one taking effect.

The openai-engine test needs an OpenAI-compatible server other than memstage's own: a hosted
provider cannot be reached from here, so a small FastAPI app served by uvicorn on loopback stands in
for it (a real HTTP server that records what it was sent), and `memstage query` must reach it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import run_json, serve_in_thread
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from memstage.settings import (
    DEFAULT_ANSWER_BUDGET,
    DEFAULT_EXCERPT_WORDS,
    Settings,
    get_settings,
    reload_settings,
)


def test_settings_read_every_variable_with_defaults_and_checks(tmp_path: Path) -> None:
    s = Settings.from_env({})
    assert (s.runner, s.generator, s.device, s.vector_backend, s.encoders) == (
        "auto",
        "transformers",
        "auto",
        "auto",
        16,
    )
    s = Settings.from_env(
        {"MEMSTAGE_HOME": str(tmp_path), "MEMSTAGE_GENERATOR": "openai", "MEMSTAGE_ENCODERS": "3"}
    )
    assert (s.home, s.generator, s.encoders) == (tmp_path, "openai", 3)
    assert s.worker_env()["MEMSTAGE_GENERATOR"] == "openai"
    with pytest.raises(ValueError, match="MEMSTAGE_GENERATOR='llama.cpp' is not one of"):
        Settings.from_env({"MEMSTAGE_GENERATOR": "llama.cpp"})
    with pytest.raises(ValueError, match="MEMSTAGE_THREADS='many' is not an integer"):
        Settings.from_env({"MEMSTAGE_THREADS": "many"})
    assert Settings.from_env({}).answer_budget == DEFAULT_ANSWER_BUDGET
    assert (
        Settings.from_env({"MEMSTAGE_ANSWER_BUDGET": "120"}).worker_env()["MEMSTAGE_ANSWER_BUDGET"] == "120"
    )
    with pytest.raises(ValueError, match="MEMSTAGE_ANSWER_BUDGET='0' must be a positive integer"):
        Settings.from_env({"MEMSTAGE_ANSWER_BUDGET": "0"})
    with pytest.raises(ValueError, match="MEMSTAGE_GENERATOR_DTYPE='fp8' is not one of"):
        Settings.from_env({"MEMSTAGE_GENERATOR_DTYPE": "fp8"})
    assert Settings.from_env({}).excerpt_words == DEFAULT_EXCERPT_WORDS
    assert Settings.from_env({"MEMSTAGE_EXCERPT_WORDS": "0"}).excerpt_words == 0
    assert Settings.from_env({"MEMSTAGE_EXCERPT_WORDS": "60"}).worker_env()["MEMSTAGE_EXCERPT_WORDS"] == "60"
    with pytest.raises(ValueError, match="MEMSTAGE_EXCERPT_WORDS='-1' must be 0 or a positive integer"):
        Settings.from_env({"MEMSTAGE_EXCERPT_WORDS": "-1"})


def test_generator_dtype_follows_the_setting_and_the_cpu(tmp_path: Path, monkeypatch) -> None:
    from memstage.gpu.encoder import cpu_has_bf16, generator_dtype

    flags = tmp_path / "cpuinfo"
    flags.write_text("processor : 0\nflags : fpu sse2 avx512f avx512_bf16\n")
    assert cpu_has_bf16(str(flags)) and not cpu_has_bf16(str(tmp_path / "none"))
    flags.write_text("flags : fpu sse2 avx2\n")
    assert not cpu_has_bf16(str(flags))
    assert generator_dtype("cuda:0") == "bfloat16"
    monkeypatch.setenv("MEMSTAGE_GENERATOR_DTYPE", "float32")
    reload_settings()
    try:
        assert generator_dtype("cuda:0") == generator_dtype("cpu") == "float32"
    finally:
        monkeypatch.delenv("MEMSTAGE_GENERATOR_DTYPE")
        reload_settings()


def test_importing_memstage_changes_no_environment() -> None:
    import subprocess
    import sys

    code = (
        "import os; before = dict(os.environ); "
        "import memstage.cli.main, memstage.runtime.backends, memstage.flows.stages, memstage.server.app; "
        "print(sorted(set(os.environ.items()) ^ set(before.items())))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_serving_commands_get_passive_openmp_threads_unless_set() -> None:
    """`memstage serve/query/retrieve` set OMP_WAIT_POLICY=PASSIVE before torch starts (spinning idle
    OpenMP teams of the server's request threads made a warm query 18x slower); other commands do not,
    and a value already set wins."""
    import subprocess
    import sys

    from memstage.cli.main import SERVING_COMMANDS

    code = (
        "import os; from memstage.settings import apply_process_defaults as a; "
        "a(); plain = os.environ.get('OMP_WAIT_POLICY'); a(serving=True); print(plain, os.environ['OMP_WAIT_POLICY'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["None", "PASSIVE"]
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
    )
    assert out.stdout.split() == ["ACTIVE", "ACTIVE"]
    assert {"query", "retrieve", "serve"} <= set(SERVING_COMMANDS) and "ingest" not in SERVING_COMMANDS


def _remote_llm(seen: list[dict]):
    """An OpenAI-compatible chat server answering every question with one fixed, recognisable text.
    (FastAPI and Request are imported at module level: FastAPI resolves these annotations there.)"""
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "remote-llm", "object": "model", "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        seen.append(await request.json())

        def chunk(**fields) -> str:
            body = {"id": "c1", "object": "chat.completion.chunk", "created": int(time.time())}
            return "data: " + json.dumps({**body, "model": "remote-llm", **fields}) + "\n\n"

        def events():
            yield chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": "remote: "}}])
            yield chunk(choices=[{"index": 0, "delta": {"content": "Biscuit"}, "finish_reason": "stop"}])
            yield chunk(choices=[], usage={"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_memstage_generator_openai_reaches_the_openai_engine(indexed_sample, capfd, monkeypatch) -> None:
    seen: list[dict] = []
    url, server = serve_in_thread(_remote_llm(seen))
    try:
        monkeypatch.setenv("MEMSTAGE_GENERATOR", "openai")
        monkeypatch.setenv("MEMSTAGE_OPENAI_BASE_URL", url)
        get_settings.cache_clear()
        question = "What is the name of Maya's dog?"
        home = str(indexed_sample.home)
        result = run_json(
            capfd, "query", question, "--namespace", "demo", "--home", home, "--runner", "local"
        )
    finally:
        server.should_exit = True
    assert result["engine"] == "openai" and result["answer"] == "remote: Biscuit"
    assert len(seen) == 1 and seen[0]["model"] == "remote-llm"
    prompt = "\n".join(m["content"] for m in seen[0]["messages"])
    assert question in prompt, prompt  # the question and its evidence went to the configured engine
    # the evidence is quoted in the prompt (speaker prefix moved, quotes escaped): look for its words
    assert any(all(w in prompt for w in m["text"].split()[-4:]) for m in result["memories"]), prompt
