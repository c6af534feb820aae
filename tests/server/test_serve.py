"""`memstage serve`: the official `openai` client and our HTTP engine get answers from a namespace's memory."""

from __future__ import annotations

import os
from pathlib import Path

import openai
import pytest
from conftest import indexed_turns, serve_in_thread

TURNS = {
    "alpha": [
        ("s1", "2023-05-08T13:00:00Z", "Ann", "I adopted a cat named Miso last week."),
        ("s1", "2023-05-08T13:01:00Z", "Bob", "Lovely! What colour is she?"),
        ("s1", "2023-05-08T13:02:00Z", "Ann", "Orange with a white tail."),
        ("s2", "2023-10-20T09:00:00Z", "Bob", "I ran a half marathon in Lisbon on Sunday."),
    ],
    "beta": [
        ("s1", "2024-01-02T10:00:00Z", "Cy", "My dog Pepper is sick, we went to the vet."),
        ("s1", "2024-01-02T10:01:00Z", "Di", "I bought a red bicycle yesterday."),
    ],
}


class Services:
    """What the app needs from `flows.services.MemoryServices`, over the test's own store and models."""

    def __init__(self, store, retriever, counter, generator) -> None:
        self.store, self.counter = store, counter
        self._retriever, self._generator = retriever, generator

    def retrieve(self, namespace: str, question: str, budget: int) -> dict:
        return self._retriever.retrieve(namespace, question, budget)

    def generator(self, engine: str = "transformers"):
        return self._generator


@pytest.fixture(scope="module")
def server(tmp_path_factory, encoder, token_counter):
    from memstage.gpu.generator import make_generator
    from memstage.server.app import create_app
    from memstage.tasks import generate
    from memstage.tasks.retrieve import Retriever

    # The memory fence's nonce is keyed by a random per-process key (`generate.fence_tag`), and
    # SmolLM2-135M's greedy answer turns on those 12 hex characters: "Miso" for most keys, "Bob" in
    # one of six runs here (each run a new key). A fixed key makes the prompt, and so the answer, the
    # same on every run; what is tested is serving, not the model's luck with a nonce.
    patch = pytest.MonkeyPatch()
    patch.setattr(generate, "_PROCESS_KEY", b"memstage-tests-0")

    store = indexed_turns(tmp_path_factory.mktemp("serve"), TURNS, encoder, token_counter)
    models = Path(os.environ.get("MEMSTAGE_MODELS") or tmp_path_factory.getbasetemp() / "models")
    gen = make_generator("transformers", models, device="cpu")
    app = create_app(
        Services(store, Retriever(store, encoder, token_counter), token_counter, gen), budget=200
    )
    url, srv = serve_in_thread(app)
    yield url, store
    srv.should_exit = True
    patch.undo()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0)


def ids_of(store, ns: str) -> set[str]:
    return set(store.memories(ns).column("id").to_pylist())


def test_models_and_an_answer_from_memory(client, server) -> None:
    assert [m.id for m in client.models.list().data] == ["memstage"]
    r = client.chat.completions.create(
        model="memstage",
        user="alpha",
        max_tokens=24,
        messages=[{"role": "user", "content": "What is the name of Ann's cat?"}],
    )
    assert "Miso" in r.choices[0].message.content
    extra = r.model_extra["memstage"]
    assert extra["namespace"] == "alpha" and set(extra["memory_ids"]) <= ids_of(server[1], "alpha")
    assert r.usage.prompt_tokens > 50 and r.usage.completion_tokens > 0
    import time

    from memstage.stores import queries

    deadline = time.monotonic() + 30  # the access journal is merged by the server's flusher thread
    while not (rows := [x for x in queries.runs(server[1], "alpha") if x["stage"] == "query"]):
        assert time.monotonic() < deadline, "the chat answer left no query run"
        time.sleep(0.2)
    figures = rows[-1]["figures"]  # recorded like every query: where, tokens, answered
    assert figures["served_by"] == "chat" and figures["prompt_tokens"] == r.usage.prompt_tokens
    assert figures["answered"] is True


def test_streaming_with_the_namespace_header_and_cached_prefix(client, server) -> None:
    def ask() -> tuple[str, object]:
        stream = client.chat.completions.create(
            model="memstage", max_tokens=16, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Who went to the vet?"}],
            extra_headers={"X-Memstage-Namespace": "beta"},
        )  # fmt: skip
        text, usage = "", None
        for chunk in stream:
            usage = chunk.usage or usage
            text += "".join(c.delta.content or "" for c in chunk.choices)
        return text, usage

    first, u1 = ask()
    second, u2 = ask()
    assert first and first == second
    assert (
        u2.prompt_tokens_details.cached_tokens == u2.prompt_tokens - 1
    )  # the same prompt: all but the last token


def test_http_engine_against_serve(server) -> None:
    from memstage.gpu.generator import OpenAIHTTPGenerator

    gen = OpenAIHTTPGenerator(base_url=server[0])
    r = gen.generate(
        [{"role": "user", "content": "Where was the half marathon?"}], max_tokens=16, user="alpha"
    )
    assert r.text and r.prompt_tokens > 0 and r.completion_tokens > 0 and r.ttft_s <= r.total_s
    gen.close()


def test_bad_requests_get_http_errors(client) -> None:
    msgs = [{"role": "user", "content": "What is the name of Ann's cat?"}]
    with pytest.raises(openai.NotFoundError):  # unknown namespace: an error, not someone else's memories
        client.chat.completions.create(model="memstage", user="gamma", messages=msgs)
    with pytest.raises(openai.BadRequestError):  # no namespace at all
        client.chat.completions.create(model="memstage", messages=msgs)
    with pytest.raises(openai.BadRequestError):  # malformed namespace
        client.chat.completions.create(model="memstage", user="../alpha", messages=msgs)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="memstage", user="alpha", messages=[])
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="memstage", user="alpha", messages=msgs, max_tokens=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="memstage", user="alpha", messages=[{"role": "user", "content": " "}]
        )


def test_namespaces_never_cross(client, server) -> None:
    r = client.chat.completions.create(
        model="memstage",
        user="beta",
        max_tokens=8,
        messages=[{"role": "user", "content": "What is the name of Ann's cat?"}],
    )
    got = set(r.model_extra["memstage"]["memory_ids"])
    assert got and got <= ids_of(server[1], "beta") and not got & ids_of(server[1], "alpha")


def test_serve_exposes_prometheus_metrics(server):
    import httpx

    text = httpx.get(server[0].removesuffix("/v1") + "/metrics").text
    assert "memstage" in text and "# TYPE" in text
