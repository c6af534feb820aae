"""`memstage serve`'s app: an OpenAI-compatible chat endpoint that answers with a namespace's memory.

`/v1/models` and `/v1/chat/completions` (server/chat.py), `/health`, `/metrics` (server/metrics.py)
and the operator's local routes (server/local_routes.py: the warm CLI query, the report). The
namespace comes from the `X-Memstage-Namespace` header or the request's `user` field. Bad requests
get OpenAI-style errors: 400 for a missing, malformed or ambiguous namespace or message, 401 without
a valid API key (unless served with `--insecure-local`), 403 for a namespace the key may not read,
404 for a namespace the store does not hold (never another tenant's data), 413 over a size limit,
422 for a body that does not parse. Keys, limits and the namespace rule live in server/guard.py;
the `memstage serve` command in cli/serve_commands.py.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from memstage.server.chat import MODEL_ID, ChatConfig, mount_chat
from memstage.server.guard import (
    ALL,
    AUTH_RESPONSES,
    ERROR_RESPONSES,
    ApiError,
    BodyLimit,
    Limits,
    authorize,
    error_json,
    known_namespaces,
)


def require_namespace(ns: str, store: Any) -> str:
    """400 for a malformed name, 404 for one the store does not hold (never a list of the others)."""
    from memstage.stores.store import NamespaceError, validate_namespace

    try:
        validate_namespace(ns)
    except NamespaceError as exc:
        raise ApiError(400, str(exc), "namespace_invalid") from exc
    try:
        known_namespaces.require(store, ns)
    except NamespaceError as exc:  # say only that it is unknown: the list of other tenants stays private
        raise ApiError(404, f"namespace {ns!r} not found", "namespace_not_found") from exc
    return ns


def _flushing(home: Any, interval_s: float) -> Any:
    """The app's lifespan: the access journal's flusher runs while the app serves."""
    import contextlib

    from memstage.stores.access_log import AccessFlusher

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        flusher = AccessFlusher(home, interval_s=interval_s).start()
        try:
            yield
        finally:
            from starlette.concurrency import run_in_threadpool

            await run_in_threadpool(flusher.stop)

    return lifespan


def _error_handlers(app: FastAPI) -> None:
    """OpenAI-style error bodies for our own errors and for bodies that do not parse."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_json(exc.status, exc.message, exc.code), exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())[:1000]
        return JSONResponse(
            {"error": {"message": msg, "type": "invalid_request_error", "code": "invalid_body"}}, 422
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
    flush_interval_s: float = 1.0,
) -> FastAPI:
    """The app over one `MemoryServices` (store, retriever, generator); tests pass their own.

        `keys` (a stores.keys.KeyRing) makes every /v1 request need a key; None serves without
        authentication (`memstage serve --insecure-local` only). `metrics_namespaces` puts namespace
        names in /metrics labels (off: other tenants' names stay private). Queries' records (runs rows,
    access counts) go to the access journal; a thread merges it every `flush_interval_s` and once more
    at shutdown (stores/access_log.py), so no query waits for the store's writer lock."""
    from memstage.server.metrics import generator_cache_stats, mount_metrics

    limits = limits or Limits()
    app = FastAPI(
        lifespan=_flushing(services.store.home, flush_interval_s),
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

    _error_handlers(app)

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

    mount_chat(app, services, caller, ChatConfig(budget, engine, standing_budget, limits), metrics)
    return app
