"""Generator engines: transformers answers and streams; the HTTP engine against a real server on loopback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import serve_in_thread
from fastapi import Request  # module level: FastAPI resolves the string annotations here

from memstage.gpu.generator import GenerationResult, OpenAIHTTPGenerator, make_generator


def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The suite's shared model cache when conftest sets one, else one folder per test session.
    return Path(os.environ.get("MEMSTAGE_MODELS") or tmp_path_factory.getbasetemp() / "models")


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    return make_generator("transformers", models_root(tmp_path_factory), device="cpu")


def test_transformers_engine_answers_and_streams(generator) -> None:
    pieces: list[str] = []
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = generator.generate(msgs, max_tokens=16, on_text=pieces.append)
    assert isinstance(r, GenerationResult) and "Paris" in r.text
    assert "".join(pieces) == r.text
    u = r.usage()
    assert set(u) >= {"prompt_tokens", "cached_tokens", "ttft_ms", "total_ms", "tokens_per_s"}
    assert u["prompt_tokens"] > 10 and 0 < u["ttft_ms"] <= u["total_ms"] and r.completion_tokens > 0
    again = generator.generate(msgs, max_tokens=16)
    assert again.text == r.text and again.cached_tokens == again.prompt_tokens - 1


def test_guard_stops_at_stop_strings_and_never_loops(generator) -> None:
    from memstage.gpu.generator import GenerationOptions
    from memstage.tasks.generate import NO_REPEAT_NGRAM, REPETITION_PENALTY, repeats

    msgs = [{"role": "user", "content": "Write the word 'Sam:' twenty times, separated by spaces."}]
    plain = generator.generate(msgs, max_tokens=32)
    guard = GenerationOptions(repetition_penalty=REPETITION_PENALTY, no_repeat_ngram=NO_REPEAT_NGRAM)
    guarded = generator.generate(msgs, max_tokens=32, options=guard)
    assert repeats(plain.text) and not repeats(guarded.text)  # the unguarded model loops; the guard stops it
    france = [{"role": "user", "content": "What is the capital of France?"}]
    cut = generator.generate(france, max_tokens=16, options=GenerationOptions(stop=("Paris",)))
    assert "Paris" not in cut.text and cut.finish_reason == "stop"


@pytest.fixture(scope="module")
def fake_openai_server():
    """A small OpenAI-compatible server (FastAPI, SSE) that reports usage like vLLM does."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    seen: list[dict] = []

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "tiny", "object": "model", "created": 0, "owned_by": "t"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body)
        words = ["Hello", " from", " the", " server."]

        def events():
            for w in words:
                c = {
                    "id": "x",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}],
                }
                yield f"data: {json.dumps(c)}\n\n"
            end = {
                "id": "x",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            }
            yield f"data: {json.dumps(end)}\n\n"
            usage = {
                "id": "x",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body["model"],
                "choices": [],
                "usage": {
                    "prompt_tokens": 40,
                    "completion_tokens": 4,
                    "total_tokens": 44,
                    "prompt_tokens_details": {"cached_tokens": 32},
                },
            }
            yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    url, server = serve_in_thread(app)
    yield url, seen
    server.should_exit = True


def test_http_engine_streams_and_reads_usage(fake_openai_server) -> None:
    url, seen = fake_openai_server
    gen = make_generator("openai", "unused", base_url=url)
    assert isinstance(gen, OpenAIHTTPGenerator) and gen.model == "tiny"  # first model the server lists
    pieces: list[str] = []
    r = gen.generate([{"role": "user", "content": "hi"}], max_tokens=8, on_text=pieces.append, user="alpha")
    assert r.text == "Hello from the server." and pieces == ["Hello", " from", " the", " server."]
    assert (r.prompt_tokens, r.cached_tokens, r.completion_tokens) == (40, 32, 4)
    assert 0 < r.ttft_s <= r.total_s and r.finish_reason == "stop"
    req = seen[-1]
    assert (
        req["stream"] is True and req["stream_options"] == {"include_usage": True} and req["user"] == "alpha"
    )
    gen.close()


def test_factory_rejects_what_it_cannot_build(tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="unknown generator engine"):
        make_generator("llama.cpp", tmp_path)
    monkeypatch.delenv("MEMSTAGE_OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="base_url"):
        make_generator("openai", tmp_path)


def test_device_is_overridable(monkeypatch) -> None:
    from memstage.gpu.encoder import pick_device

    monkeypatch.setenv("MEMSTAGE_DEVICE", "cpu")
    assert pick_device(None) == "cpu"
    assert pick_device("cuda:1") == "cuda:1"


def test_vllm_engine() -> None:
    pytest.importorskip(
        "vllm",
        reason="vLLM needs CUDA and pins its own torch (2.14); it cannot be installed on these CPU-only machines",
    )
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vLLM runs on CUDA only")
    from memstage.gpu.tokenizer import ensure_converted

    gen = make_generator(
        "vllm", ensure_converted(Path(os.environ.get("MEMSTAGE_MODELS", "/tmp/memstage-models")))
    )
    msgs = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"},
    ]
    first, second = gen.generate(msgs, max_tokens=8), gen.generate(msgs, max_tokens=8)
    assert "Paris" in first.text and second.cached_tokens > 0


def test_token_counter_matches_the_generators_tokenizer(generator, token_counter) -> None:
    """Budgets are counted with the light tokenizer; they must equal the generator's own counts."""
    texts = [
        "Caroline: I went to the LGBTQ support group yesterday.",
        "héllo wörld 🙂\n\n  x",
        "",
        "<|im_start|>",
    ]
    expected = [len(generator.tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    assert token_counter.count_many(texts) == expected
    assert [token_counter.count(t) for t in texts] == expected


# ---- the generate stage's prompt layout (tasks/generate.py) -------------------------------------


def mem(mid: str, when: str, score: float, tokens: int = 10, text: str | None = None) -> dict:
    return {"memory_id": mid, "text": text or f"memory {mid}", "score": score, "level": 0, "tokens": tokens,
            "event_ids": [], "dia_ids": [], "session": "s1", "event_time": when}  # fmt: skip


def test_prompt_layout_is_stable_first_and_ignores_scores() -> None:
    from memstage.tasks.generate import build_messages

    a = {"question": "Q1?", "memories": [mem("b", "2023-02-01", 0.9), mem("a", "2023-01-01", 0.1)]}
    b = {"question": "Q2?", "memories": [mem("a", "2023-01-01", 0.8), mem("c", "2023-03-01", 0.7)]}
    ma, mb = build_messages(a, standing="[s1] profile"), build_messages(b, standing="[s1] profile")
    assert ma[0] == mb[0] and "profile" not in ma[0]["content"]  # system: instructions only, identical
    ua, ub = ma[1]["content"], mb[1]["content"]
    assert ua.index("[s1] profile") < ua.index("memory a") < ua.index("memory b")  # by event time, not score
    assert ua.rstrip().endswith("Question: Q1?\nAnswer:")
    shared = len(os.path.commonprefix([ua, ub]))
    assert "memory a\n" in ua[:shared]  # consecutive questions share the standing block and common evidence


def test_evidence_window_is_append_only_until_full() -> None:
    from memstage.tasks.generate import EvidenceWindow, build_messages

    w = EvidenceWindow(max_tokens=35)
    first = build_messages(
        {"question": "Q1?", "memories": [mem("b", "2023-02", 0.9), mem("a", "2023-01", 0.5)]}, window=w
    )
    second = build_messages(
        {"question": "Q2?", "memories": [mem("c", "2023-00", 0.9), mem("a", "2023-01", 0.5)]}, window=w
    )
    evidence = first[1]["content"].split("\n</memories")[0]
    assert second[1]["content"].startswith(evidence)  # earlier evidence kept in place, new appended
    assert [m["memory_id"] for m in w.items] == ["a", "b", "c"] and w.tokens == 30
    build_messages({"question": "Q3?", "memories": [mem("d", "2023-04", 0.9)]}, window=w)
    build_messages({"question": "Q4?", "memories": [mem("e", "2023-05", 0.9)]}, window=w)
    assert w.resets == 1 and [m["memory_id"] for m in w.items] == ["d", "e"]  # Q3 passed 35: reset


def test_standing_block_by_level_and_importance_within_budget() -> None:
    import pyarrow as pa

    from memstage.tasks.generate import standing_block

    rows = [
        {"id": "t1", "level": 2, "text": "topic one", "tokens": 5, "importance": 0.1, "access_count": 0, "event_time": None},
        {"id": "s1", "level": 1, "text": "session one", "tokens": 5, "importance": 0.9, "access_count": 0, "event_time": None},
        {"id": "s2", "level": 1, "text": "session two", "tokens": 5, "importance": 0.2, "access_count": 99, "event_time": None},
        {"id": "r1", "level": 0, "text": "raw turn", "tokens": 1, "importance": 1.0, "access_count": 99, "event_time": None},
    ]  # fmt: skip
    block = standing_block(pa.Table.from_pylist(rows), budget=10, count_tokens=len)
    assert block == "[s1] topic one\n[s2] session one"  # access counts ignored: they change every query
    assert standing_block(pa.Table.from_pylist(rows[3:]), budget=10, count_tokens=len) == ""


def test_answer_question_reports_usage() -> None:
    from memstage.tasks.generate import answer_question

    class Echo:
        name = "echo"

        def generate(self, messages, *, max_tokens, temperature, on_text=None):
            return GenerationResult("  yes [m1]\nBob: and more ", 120, 100, 2, 0.01, 0.02)

    out = answer_question(Echo(), {"question": "Q?", "memories": [mem("a", "2023-01-01", 1.0)]})
    assert out["answer"] == "yes [m1]" and out["citations"] == ["a"]  # cut at the next speaker tag
    assert set(out["usage"]) >= {"prompt_tokens", "cached_tokens", "ttft_ms", "total_ms", "tokens_per_s"}
    with pytest.raises(ValueError):
        answer_question(Echo(), {"question": " ", "memories": []})
    assert answer_question(Echo(), {"question": "Q?", "memories": []})["answer"] == "I don't know."


def test_clean_answer_cuts_tags_and_loops() -> None:
    from memstage.tasks.generate import clean_answer, repeats

    assert clean_answer("Sam: Sam: Sam: Sam: Sam:") == "Sam:"
    assert clean_answer("In Berlin [m3].\nMaya: bye") == "In Berlin [m3]."
    assert clean_answer("Answer: Pepper") == "Pepper"
    assert repeats("in Berlin, in Berlin, in Berlin") and not repeats("Maya lives in Berlin now.")


def test_generator_reads_the_best_memories_within_the_answer_budget() -> None:
    from memstage.tasks.generate import answer_evidence, answer_question

    ms = [mem("a", "2023-01-01", 0.9, 60), mem("b", "2023-01-02", 0.8, 50), mem("c", "2023-01-03", 0.7, 30),
          mem("d", "2023-01-04", 0.1, 5)]  # fmt: skip
    assert [m["memory_id"] for m in answer_evidence(ms, 100)] == ["a", "c", "d"]  # b does not fit: skipped
    assert [m["memory_id"] for m in answer_evidence(ms, 100, top=2)] == ["a"]  # top first, then the budget
    assert len(answer_evidence(ms, None)) == 4
    [cut] = answer_evidence([mem("x", "2023-01-01", 0.5, 100, text="w " * 200)], 25)
    assert cut["tokens"] == 25 and len(cut["text"]) < 120 and cut["text"].endswith("\u2026")  # never empty

    class Seen:
        name = "seen"

        def generate(self, messages, *, max_tokens, temperature, on_text=None):
            self.prompt, self.max_tokens = messages[1]["content"], max_tokens
            return GenerationResult("In Berlin [m1].", 50, 40, 4, 0.01, 0.02)

    engine = Seen()
    out = answer_question(engine, {"question": "Q?", "memories": ms}, answer_budget=60)
    assert "memory a" in engine.prompt and "memory b" not in engine.prompt and out["read"] == ["a"]
    assert "[m1] 1 January 2023: memory a" in engine.prompt  # a day as LoCoMo's gold answers write it
    assert engine.max_tokens <= 24  # a short answer: decoding is half of a CPU answer's time


def test_answer_ends_at_its_first_sentence(generator) -> None:
    from memstage.gpu.generator import GenerationOptions
    from memstage.tasks.generate import stop_strings

    msgs = [{"role": "user", "content": "Tell me three facts about Paris, one sentence each."}]
    out = generator.generate(msgs, max_tokens=48, options=GenerationOptions(stop=stop_strings({})))
    assert out.finish_reason == "stop" and ". " not in out.text and "\n" not in out.text
