"""Tenancy of `memstage serve`: API keys (401), the namespaces a key may read (403), header/`user`
agreement (400), size limits (413), /metrics without namespace names, the OpenAPI documentation of
all of it, a bounded schemathesis run against /openapi.json, and the `memstage serve` contract."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from conftest import indexed_turns, serve_in_thread

TURNS = {
    "demo": [("s1", "2023-05-08T13:00:00Z", "Ann", "I adopted a cat named Miso last week.")],
    "other": [("s1", "2024-01-02T10:00:00Z", "Cy", "My dog Pepper is sick, we went to the vet.")],
}
QUESTION = [{"role": "user", "content": "What is the name of Ann's cat?"}]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, encoder, token_counter):
    from memstage.runtime.services import MemoryServices
    from memstage.server.app import create_app
    from memstage.server.guard import Limits
    from memstage.stores.keys import KeyRing

    store = indexed_turns(tmp_path_factory.mktemp("tenancy"), TURNS, encoder, token_counter)
    ring = KeyRing(store.home)
    keys = {
        "demo": ring.add(["demo"], "demo only")[0],
        "all": ring.add(["*"], "everything")[0],
        "revoked": ring.add(["demo"], "revoked")[0],
    }
    ring.revoke(keys["revoked"].split("_")[1])
    app = create_app(
        MemoryServices(str(store.home)),
        keys=KeyRing(store.home),
        limits=Limits(max_body_bytes=64 * 1024, max_question_chars=2000),
    )
    url, server = serve_in_thread(app)
    yield url.removesuffix("/v1"), keys, store
    server.should_exit = True


def chat(base: str, key: str | None, body: dict, **headers: str) -> httpx.Response:
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=120)


def test_no_key_a_wrong_key_or_a_revoked_key_gets_401(guarded):
    base, keys, _ = guarded
    for key in (None, "msk_00000000_wrong", keys["revoked"], keys["demo"] + "x"):
        r = chat(base, key, {"model": "memstage", "user": "demo", "messages": QUESTION})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert (
        httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {keys['demo']}"}).status_code == 200
    )


def test_a_key_reads_only_its_namespaces_and_learns_nothing_of_others(guarded):
    base, keys, _ = guarded
    for ns in ("other", "nobody"):  # another tenant and a missing one look the same: 403
        r = chat(base, keys["demo"], {"user": ns, "messages": QUESTION})
        assert r.status_code == 403, r.text
        assert ns not in r.json()["error"]["message"]
    assert chat(base, keys["all"], {"user": "nobody", "messages": QUESTION}).status_code == 404


def test_header_and_user_that_disagree_are_a_400(guarded):
    base, keys, _ = guarded
    r = chat(base, keys["all"], {"user": "other", "messages": QUESTION}, **{"X-Memstage-Namespace": "demo"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "namespace_mismatch"


def test_oversized_bodies_and_questions_get_413_before_any_work(guarded):
    base, keys, _ = guarded
    big = {"user": "demo", "messages": [{"role": "user", "content": "x" * 100_000}]}
    for key in (None, keys["demo"]):  # the size limit comes first, key or not
        r = chat(base, key, big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: the bytes actually sent are counted
        yield b'{"user": "demo", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"y" * 1024
        yield b'"}]}'

    r = httpx.post(
        f"{base}/v1/chat/completions",
        content=chunks(),
        headers={"Authorization": f"Bearer {keys['demo']}", "Content-Type": "application/json"},
    )
    assert r.status_code == 413
    long_question = {"user": "demo", "messages": [{"role": "user", "content": "why " * 1000}]}
    r = chat(base, keys["demo"], long_question)
    assert r.status_code == 413 and r.json()["error"]["code"] == "question_too_large"


def test_metrics_name_no_namespace_unless_opted_in(guarded):
    base, _, store = guarded
    text = httpx.get(f"{base}/metrics").text
    assert "memstage_memories" in text
    assert "demo" not in text and "other" not in text


def test_openapi_documents_the_errors_the_key_and_the_namespace(guarded):
    base, _, _ = guarded
    spec = httpx.get(f"{base}/openapi.json").json()
    op = spec["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "401", "403", "404", "413", "422"} <= set(op["responses"])
    assert any(p["name"] == "x-memstage-namespace" and p["in"] == "header" for p in op["parameters"])
    assert op["security"] and spec["components"]["securitySchemes"]
    assert "401" in spec["paths"]["/v1/models"]["get"]["responses"]


def test_schemathesis_against_openapi_no_5xx_no_undocumented_status(guarded, tmp_path):
    pytest.importorskip("schemathesis")
    base, keys, _ = guarded
    summaries = []
    for auth in ([], ["-H", f"Authorization: Bearer {keys['demo']}"]):
        proc = subprocess.run(
            [
                sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json",
                "--checks", "not_a_server_error,status_code_conformance,content_type_conformance",
                "--max-examples", "40", "--seed", "20", "--request-timeout", "120",
                "--max-response-time", "120", "--report-dir", str(tmp_path), *auth,
            ],
            capture_output=True, text=True, timeout=500, cwd=tmp_path,  # its .schemathesis cache there
        )  # fmt: skip
        summaries.append(proc.stdout[-1500:])
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    print("\n".join(summaries))  # the summary, for the record (pytest -s)


def test_memstage_serve_without_flags_refuses_unauthenticated_and_oversized(tmp_path):
    """The output contract: `memstage serve --home H --port P` alone -> 401 without a key, 413 over the limit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "import sys; from memstage.cli.main import main; sys.exit(main())"]
    proc = subprocess.Popen(
        [*cmd, "serve", "--home", str(tmp_path / "home"), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ),
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.5)
        r = httpx.post(f"{base}/v1/chat/completions", json={"user": "demo", "messages": QUESTION})
        assert r.status_code == 401
        big = json.dumps({"user": "demo", "messages": [{"role": "user", "content": "x" * 10_000_000}]})
        r = httpx.post(
            f"{base}/v1/chat/completions", content=big, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 413
    finally:
        proc.terminate()
        proc.wait(timeout=30)
