"""`memstage serve`: an OpenAI-compatible chat endpoint that answers with a namespace's memory.

`/v1/models` and `/v1/chat/completions` (streamed as server-sent events, or whole). The namespace
comes from the `X-Memstage-Namespace` header or the request's `user` field; memories are retrieved
for the last user message and packed into the prompt by `tasks.generate` (stable parts first, so
the engine's prefix cache hits across questions). Bad requests get OpenAI-style errors: 400 for a
missing, malformed or ambiguous namespace or message, 401 without a valid API key (unless served
with `--insecure-local`), 403 for a namespace the key may not read, 404 for a namespace the store
does not hold (never another tenant's data), 413 over a size limit, 422 for a body that does not
parse. Keys, limits and the namespace rule live in server/guard.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from memstage.server.guard import (
    ALL,
    AUTH_RESPONSES,
    ERROR_RESPONSES,
    ApiError,
    BodyLimit,
    Limits,
    authorize,
    check_question,
    error_json,
    resolve_namespace,
)
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

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


NAMESPACE_DOC = (
    "the memory namespace to answer from; required here or in the body's `user` field (both: they must agree)"
)


def create_app(
    services: Any,
    *,
    budget: int = 1000,
    engine: str | None = None,
    standing_budget: int = 1500,
    keys: Any | None = None,
    limits: Limits | None = None,
    metrics_namespaces: bool = False,
    local_token: str | None = None,
) -> FastAPI:
    """The app over one `MemoryServices` (store, retriever, generator); tests pass their own.

    `keys` (a stores.keys.KeyRing) makes every /v1 request need a key; None serves without
    authentication (`memstage serve --insecure-local` only). `metrics_namespaces` puts namespace
    names in /metrics labels (off: other tenants' names stay private)."""
    from memstage.server.metrics import generator_cache_stats, mount_metrics
    from memstage.tasks.generate import standing_block

    limits = limits or Limits()
    app = FastAPI(
        title="memstage",
        version="0.1.0",
        description="OpenAI-compatible chat over a namespace's memory. Every /v1 request needs "
        "`Authorization: Bearer <key>` (a key from `memstage keys add`) unless the server runs with "
        "--insecure-local; /v1/chat/completions needs a namespace (X-Memstage-Namespace header or `user`).",
    )
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.state.generator = None
    metrics = mount_metrics(
        app,
        cache_stats=lambda: generator_cache_stats(app.state.generator),
        store=services.store,
        namespaces=metrics_namespaces,
    )
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    bearer = HTTPBearer(auto_error=False, description="an API key from `memstage keys add`")

    def caller(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Any:
        return authorize(keys, credentials.credentials if credentials else None, local_token)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_json(exc.status, exc.message, exc.code), exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())[:1000]
        return JSONResponse(
            {"error": {"message": msg, "type": "invalid_request_error", "code": "invalid_body"}}, 422
        )

    from memstage.server.local_routes import mount_local_routes

    def operator(key: Any = Depends(caller)) -> Any:
        """The local routes (warm CLI query, report) read every namespace: an all-namespaces key only."""
        if key is not None and ALL not in key.namespaces:
            raise ApiError(403, "this route needs an all-namespaces key", "operator_only")
        return key

    mount_local_routes(
        app,
        services,
        check_namespace=lambda ns: require_namespace(ns, services.store),
        dependencies=[Depends(operator)],
        responses=ERROR_RESPONSES,
    )

    @app.get("/v1/models", responses=AUTH_RESPONSES)
    async def models(_key: Any = Depends(caller)) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "memstage"}],
        }

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    def prepare(
        header: str | None, key: Any, body: ChatRequest
    ) -> tuple[str, dict[str, Any], list[dict[str, str]]]:
        ns = resolve_namespace(header, body.user, key, services.store)
        users = [m for m in body.messages if m.role == "user"]
        question = users[-1].text().strip() if users else ""
        check_question(question, len(body.messages), limits)
        if not question:
            raise ApiError(400, "the last user message is empty", "message_missing")
        retrieval = services.retrieve(ns, question, budget)
        standing = standing_block(services.store.memories(ns), standing_budget, services.counter.count)
        return ns, retrieval, _messages(body, retrieval, standing)

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses={
            200: {
                "description": "the answer (JSON), or server-sent events with `stream: true`",
                "content": {"application/json": {}, "text/event-stream": {}},
            },
            **ERROR_RESPONSES,
        },
    )
    async def chat(
        body: ChatRequest,
        key: Any = Depends(caller),
        x_memstage_namespace: str | None = Header(None, description=NAMESPACE_DOC),
    ) -> Any:
        ns, retrieval, messages = await run_in_threadpool(prepare, x_memstage_namespace, key, body)
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
    from memstage.cli.main import UserError, config_from
    from memstage.runtime.services import services
    from memstage.server.local import remove_service_file, write_service_file
    from memstage.stores.keys import KeyRing

    config = config_from(args)
    config.home.mkdir(parents=True, exist_ok=True)
    keys = None if args.insecure_local else KeyRing(config.home)
    if args.insecure_local and args.host not in ("127.0.0.1", "localhost", "::1"):
        raise UserError(
            f"--insecure-local serves every namespace without a key: loopback only, not {args.host}"
        )
    if keys is not None and not keys.entries():
        print(
            f"memstage serve: no API keys in {config.home}; /v1 requests get 401 until "
            "`memstage keys add --namespace NS` makes one (or use --insecure-local on loopback)",
            file=sys.stderr,
        )
    # the data directory's owner (who can read HOME/serve.json, mode 0600) queries through this token
    local_token = secrets.token_urlsafe(32)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_question_chars=args.max_question_chars)
    svc = services(config, use_ray=False)  # the instance the query flow's tasks use in this process
    app = create_app(
        svc,
        budget=args.budget,
        engine=args.engine,
        keys=keys,
        limits=limits,
        metrics_namespaces=args.metrics_namespaces,
        local_token=local_token,
    )
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))

    def warm_then_announce() -> None:
        # Load what a query needs before announcing HOME/serve.json: `memstage query` finds the server
        # only once a question costs it about a second.
        _warm(svc, args.engine)
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            write_service_file(config.home, args.host, args.port, token=local_token)

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
    p.add_argument(
        "--insecure-local",
        action="store_true",
        help="serve without API keys: any client reads any namespace (loopback hosts only)",
    )
    p.add_argument(
        "--metrics-namespaces", action="store_true", help="label /metrics gauges with namespace names"
    )
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes, help="larger bodies get 413")
    p.add_argument(
        "--max-question-chars", type=int, default=Limits.max_question_chars, help="longer questions get 413"
    )
    add_common(p)
    p.set_defaults(run=cmd_serve)
