"""`/v1/chat/completions`: the OpenAI-compatible chat route, answered from one namespace's memory.

The request's last user message is the question; memories are retrieved for it and packed into the
prompt by `tasks.generate` (stable parts first, so the engine's prefix cache hits across questions);
the client's own system text and earlier turns are kept. Answers come whole (JSON) or as server-sent
events. Keys, limits and the namespace rule are server/guard.py's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from memstage.server.guard import ERROR_RESPONSES, ApiError, Limits, check_question, resolve_namespace

MODEL_ID = "memstage"


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(str(p.get("text") or "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: str = MODEL_ID
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    user: str | None = None


def _messages(body: ChatRequest, retrieval: dict[str, Any], standing: str) -> list[dict[str, str]]:
    """Our layout (system + standing block, evidence, question) with the client's own turns kept."""
    from memstage.tasks.generate import SYSTEM_TEXT, build_messages

    client_system = "\n".join(
        m.text() for m in body.messages if m.role in ("system", "developer") and m.text()
    )
    system = SYSTEM_TEXT + ("\n\n" + client_system if client_system else "")
    base = build_messages(retrieval, standing=standing, system=system)
    turns = [m for m in body.messages if m.role in ("user", "assistant")][:-1]  # history before the question
    history = [{"role": m.role, "content": m.text()} for m in turns if m.text()]
    return [base[0], *history, base[1]]


NAMESPACE_DOC = (
    "the memory namespace to answer from; required here or in the body's `user` field (both: they must agree)"
)


@dataclass(frozen=True)
class ChatConfig:
    budget: int  # evidence tokens per answer
    engine: str | None  # generator engine (None: MEMSTAGE_GENERATOR)
    standing_budget: int  # tokens of the namespace's standing block
    limits: Limits


def _usage(result: Any, metrics: Any) -> dict[str, Any]:
    metrics.count_tokens(
        prompt=result.prompt_tokens, completion=result.completion_tokens, cached=result.cached_tokens
    )
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


@dataclass
class _Reply:
    """One answer's identity and extras, shared by its JSON and its stream."""

    rid: str
    created: int
    extra: dict[str, Any]

    def chunk(self, delta: dict[str, Any] | None, finish: str | None = None, **more: Any) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        data = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": MODEL_ID,
                "choices": choices, **more}  # fmt: skip
        return f"data: {json.dumps(data)}\n\n"


def _record(home: Any, ns: str, retrieval: dict[str, Any], result: Any, start: float) -> None:
    """A chat answer as a `runs` row (stage 'query', served_by 'chat'), like every other query."""
    from memstage.flows.query_steps import record_step

    done = {**retrieval, "answer": result.text, "usage": result.usage()}
    done["total_ms"] = round((time.perf_counter() - start) * 1000, 1)
    try:
        record_step(home, ns, done, answer=True, served_by="chat", flow_run_id=None)
    except Exception as exc:  # noqa: BLE001 - the answer matters more than its record
        logging.getLogger("memstage").warning("chat answer not recorded: %s", exc)


def _generate_in_thread(
    gen: Any, messages: list[dict[str, str]], after: Callable[[Any], None], **options: Any
) -> asyncio.Queue:
    """Run the generator in a thread; its text, its result or its error arrive on the returned queue."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def work() -> None:
        put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731
        try:
            result = gen.generate(messages, on_text=lambda t: put(("text", t)), **options)
            after(result)
            put(("done", result))
        except Exception as exc:  # reported in the stream: the status line has gone already
            put(("error", exc))

    threading.Thread(target=work, daemon=True).start()
    return queue


async def _stream(
    queue: asyncio.Queue, reply: _Reply, include_usage: bool, metrics: Any
) -> AsyncIterator[str]:
    yield reply.chunk({"role": "assistant", "content": ""})
    while True:
        kind, item = await queue.get()
        if kind == "text":
            yield reply.chunk({"content": item})
            continue
        if kind == "error":
            err = {"error": {"message": f"generation failed: {item}", "type": "server_error"}}
            yield f"data: {json.dumps(err)}\n\n"
        else:
            ttft = round(item.ttft_s * 1e3, 2)
            yield reply.chunk({}, item.finish_reason, memstage={**reply.extra, "ttft_ms": ttft})
            if include_usage:
                yield reply.chunk(None, usage=_usage(item, metrics))
        break
    yield "data: [DONE]\n\n"


def mount_chat(
    app: FastAPI, services: Any, caller: Callable[..., Any], config: ChatConfig, metrics: Any
) -> None:
    """Add POST /v1/chat/completions; `caller` is the dependency that authorises the request's key."""
    from memstage.stores.queries import summary_memories
    from memstage.tasks.generate import standing_block

    def prepare(
        header: str | None, key: Any, body: ChatRequest
    ) -> tuple[str, dict[str, Any], list[dict[str, str]]]:
        ns = resolve_namespace(header, body.user, key, services.store)
        users = [m for m in body.messages if m.role == "user"]
        question = users[-1].text().strip() if users else ""
        check_question(question, len(body.messages), config.limits)
        if not question:
            raise ApiError(400, "the last user message is empty", "message_missing")
        retrieval = services.retrieve(ns, question, config.budget)
        summaries = summary_memories(services.store, ns)  # the standing block's candidates, no embeddings
        standing = standing_block(summaries, config.standing_budget, services.counter.count)
        return ns, retrieval, _messages(body, retrieval, standing)

    ok = {
        "description": "the answer (JSON), or server-sent events with `stream: true`",
        "content": {"application/json": {}, "text/event-stream": {}},
    }

    @app.post("/v1/chat/completions", response_model=None, responses={200: ok, **ERROR_RESPONSES})
    async def chat(
        body: ChatRequest,
        key: Any = Depends(caller),
        x_memstage_namespace: str | None = Header(None, description=NAMESPACE_DOC),
    ) -> Any:
        start = time.perf_counter()
        ns, retrieval, messages = await run_in_threadpool(prepare, x_memstage_namespace, key, body)
        gen = await run_in_threadpool(services.generator, config.engine)
        app.state.generator = gen
        options = {
            "max_tokens": body.max_completion_tokens or body.max_tokens or 256,
            "temperature": body.temperature or 0.0,
        }
        reply = _Reply(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()),
                       {"namespace": ns, "memory_ids": [m["memory_id"] for m in retrieval["memories"]]})  # fmt: skip
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            after = lambda r: _record(services.store.home, ns, retrieval, r, start)  # noqa: E731
            queue = _generate_in_thread(gen, messages, after, **options)
            return StreamingResponse(
                _stream(queue, reply, include_usage, metrics), media_type="text/event-stream"
            )
        result = await run_in_threadpool(lambda: gen.generate(messages, **options))
        await run_in_threadpool(_record, services.store.home, ns, retrieval, result, start)
        return {
            "id": reply.rid, "object": "chat.completion", "created": reply.created, "model": MODEL_ID,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason}],
            "usage": _usage(result, metrics),
            "memstage": {**reply.extra, "ttft_ms": round(result.ttft_s * 1e3, 2)},
        }  # fmt: skip
