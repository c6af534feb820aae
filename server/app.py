"""`memstage serve`: an OpenAI-compatible chat endpoint that answers with a namespace's memory.

`/v1/models` and `/v1/chat/completions` (streamed as server-sent events, or whole). The namespace
comes from the `X-Memstage-Namespace` header or the request's `user` field; memories are retrieved
for the last user message and packed into the prompt by `tasks.generate` (stable parts first, so
the engine's prefix cache hits across questions). Bad requests get OpenAI-style errors: 400 for a
missing or malformed namespace or message, 404 for a namespace the store does not hold (never
another tenant's data), 422 for a body that does not parse.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

MODEL_ID = "memstage"


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


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


def _namespace(request: Request, body: ChatRequest, store: Any) -> str:
    ns = request.headers.get("x-memstage-namespace") or body.user
    if not ns:
        raise ApiError(
            400,
            "name the memory namespace in the X-Memstage-Namespace header or the `user` field",
            "namespace_missing",
        )
    return require_namespace(ns, store)


def require_namespace(ns: str, store: Any) -> str:
    """400 for a malformed name, 404 for one the store does not hold (never a list of the others)."""
    from memstage.stores.store import NamespaceError, validate_namespace

    try:
        validate_namespace(ns)
    except NamespaceError as exc:
        raise ApiError(400, str(exc), "namespace_invalid") from exc
    try:
        store.require_namespace(ns)
    except NamespaceError as exc:  # say only that it is unknown: the list of other tenants stays private
        raise ApiError(404, f"namespace {ns!r} not found", "namespace_not_found") from exc
    return ns


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


def create_app(
    services: Any, *, budget: int = 1000, engine: str | None = None, standing_budget: int = 1500
) -> FastAPI:
    """The app over one `MemoryServices` (store, retriever, generator); tests pass their own."""
    from memstage.server.metrics import generator_cache_stats, mount_metrics
    from memstage.tasks.generate import standing_block

    app = FastAPI(title="memstage", version="0.1.0")
    app.state.generator = None
    metrics = mount_metrics(
        app, cache_stats=lambda: generator_cache_stats(app.state.generator), store=services.store
    )

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": exc.message, "type": "invalid_request_error", "code": exc.code}}, exc.status
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())[:1000]
        return JSONResponse(
            {"error": {"message": msg, "type": "invalid_request_error", "code": "invalid_body"}}, 422
        )

    from memstage.server.local_routes import mount_local_routes

    mount_local_routes(app, services, check_namespace=lambda ns: require_namespace(ns, services.store))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "memstage"}],
        }

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    def prepare(request: Request, body: ChatRequest) -> tuple[str, dict[str, Any], list[dict[str, str]]]:
        ns = _namespace(request, body, services.store)
        users = [m for m in body.messages if m.role == "user"]
        question = users[-1].text().strip() if users else ""
        if not question:
            raise ApiError(400, "the last user message is empty", "message_missing")
        retrieval = services.retrieve(ns, question, budget)
        standing = standing_block(services.store.memories(ns), standing_budget, services.counter.count)
        return ns, retrieval, _messages(body, retrieval, standing)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request, body: ChatRequest) -> Any:
        ns, retrieval, messages = await run_in_threadpool(prepare, request, body)
        gen = await run_in_threadpool(services.generator, engine)
        app.state.generator = gen
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        temperature = body.temperature or 0.0
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        extra = {"namespace": ns, "memory_ids": [m["memory_id"] for m in retrieval["memories"]]}

        def usage(result: Any) -> dict[str, Any]:
            metrics.count_tokens(
                prompt=result.prompt_tokens, completion=result.completion_tokens, cached=result.cached_tokens
            )
            return {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
            }

        if not body.stream:
            result = await run_in_threadpool(
                gen.generate, messages, max_tokens=max_tokens, temperature=temperature
            )
            return {
                "id": rid, "object": "chat.completion", "created": created, "model": MODEL_ID,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}],
                "usage": usage(result),
                "memstage": {**extra, "ttft_ms": round(result.ttft_s * 1e3, 2)},
            }  # fmt: skip

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def work() -> None:
            try:
                res = gen.generate(
                    messages,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    on_text=lambda t: loop.call_soon_threadsafe(queue.put_nowait, ("text", t)),
                )
                loop.call_soon_threadsafe(queue.put_nowait, ("done", res))
            except Exception as exc:  # reported in the stream: the status line has gone already
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

        threading.Thread(target=work, daemon=True).start()

        def chunk(delta: dict[str, Any], finish: str | None = None, **more: Any) -> str:
            data = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **more}  # fmt: skip
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, item = await queue.get()
                if kind == "text":
                    yield chunk({"content": item})
                elif kind == "error":
                    err = {"error": {"message": f"generation failed: {item}", "type": "server_error"}}
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                else:
                    yield chunk(
                        {}, item.finish_reason, memstage={**extra, "ttft_ms": round(item.ttft_s * 1e3, 2)}
                    )
                    if body.stream_options and body.stream_options.include_usage:
                        data = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                "model": MODEL_ID, "choices": [], "usage": usage(item)}  # fmt: skip
                        yield f"data: {json.dumps(data)}\n\n"
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    import uvicorn
    from memstage.cli.main import config_from
    from memstage.runtime.services import services
    from memstage.server.local import remove_service_file, write_service_file

    config = config_from(args)
    config.home.mkdir(parents=True, exist_ok=True)
    svc = services(config, use_ray=False)  # the instance the query flow's tasks use in this process
    app = create_app(svc, budget=args.budget, engine=args.engine)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))

    def warm_then_announce() -> None:
        # Load what a query needs before announcing HOME/serve.json: `memstage query` finds the server
        # only once a question costs it about a second.
        _warm(svc, args.engine)
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            write_service_file(config.home, args.host, args.port)

    threading.Thread(target=warm_then_announce, name="memstage-warm", daemon=True).start()
    try:
        server.run()
    finally:
        remove_service_file(config.home)
    return {"served": f"http://{args.host}:{args.port}/v1", "home": str(config.home)}


def _warm(svc: Any, engine: str | None) -> None:
    import logging
    import os

    from memstage.settings import get_settings

    try:
        svc.warm(generator=engine or get_settings().generator)
        if os.environ.get("PREFECT_API_URL"):
            import memstage.flows.query  # noqa: F401 - Prefect's import, paid before the first query
    except Exception as exc:  # noqa: BLE001 - an empty store or a missing model: the first query says why
        logging.getLogger("memstage").warning("warming the query models failed: %s", exc)


def register(sub: argparse._SubParsersAction) -> None:
    from memstage.cli.main import add_common

    p = sub.add_parser(
        "serve", help="an OpenAI-compatible chat endpoint that answers with a namespace's memory"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--budget", type=int, default=1000, help="evidence tokens per answer (default 1000)")
    p.add_argument("--engine", default=None, help="generator engine: transformers (default), openai, vllm")
    add_common(p)
    p.set_defaults(run=cmd_serve)
