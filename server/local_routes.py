"""`memstage serve`'s routes for its own command line and its operator: a warm query, and the report.

POST /memstage/query answers `memstage query` / `memstage retrieve` from the models and indexes the
server keeps loaded, without Prefect on the way. With PREFECT_API_URL set in the server's environment
the query is then recorded as a `query` flow run in that server's UI (tagged `namespace:NS` and
`served`, with its `query-NS` artifact), on a background thread after the answer has gone back.
Either way the query is recorded in the store's `runs` table.
GET /report draws `memstage report` (all namespaces, or `?namespace=NS`) and serves the page, so the
Prefect UI can link an http:// URL instead of a file on the worker. Both sit behind whatever
authentication the app applies to its other routes.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, field_validator
from starlette.concurrency import run_in_threadpool

MAX_QUESTION_CHARS = 4000


class QueryRequest(BaseModel):
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    namespace: str = Field(min_length=1, max_length=128)
    budget: int = Field(default=1000, ge=1, le=100_000)
    answer: bool = True
    engine: str | None = Field(default=None, pattern="^(transformers|openai|vllm)$")
    as_of: str | None = Field(default=None, max_length=64)  # when the question is asked

    @field_validator("as_of")
    @classmethod
    def _readable_date(cls, value: str | None) -> str | None:
        from memstage.tasks.as_of import parse_as_of

        parse_as_of(value)  # ValueError -> 422 with its message
        return value


def run_served_query(services: Any, body: QueryRequest) -> dict[str, Any]:
    """One query in this warm process: retrieve and answer with no Prefect call on the way, then, when a
    Prefect server is configured, its flow run is recorded after the answer has gone back
    (`flows.query.QueryRecorder`: one background thread; a run's API calls cost 1-4 s here); without
    one, the store's `runs` row is written at once."""
    from memstage.flows.query_steps import run_plain
    from memstage.runtime.backends import RuntimeConfig

    config = RuntimeConfig(home=services.store.home, runner="local")
    api = os.environ.get("PREFECT_API_URL")
    result = run_plain(
        body.question, body.namespace, body.budget, config,
        engine=body.engine, answer=body.answer, served_by="serve", as_of=body.as_of, record=not api,
    )  # fmt: skip
    result["served"] = {"pid": os.getpid(), "prefect_api_url": api, "flow_run_id": None}
    if api:
        recorder(config.home).submit(body.question, body.namespace, body.budget, result, body.answer)
        result["served"]["flow_run"] = "recorded after the answer"
    return result


_recorders: dict[str, Any] = {}
_recorders_lock = threading.Lock()


def recorder(home: Any) -> Any:
    """This process's `QueryRecorder` for `home` (started on the first query with a Prefect server)."""
    from memstage.flows.query import QueryRecorder

    with _recorders_lock:
        if str(home) not in _recorders or not _recorders[str(home)].thread.is_alive():
            _recorders[str(home)] = QueryRecorder(home)
        return _recorders[str(home)]


def mount_local_routes(
    app: FastAPI,
    services: Any,
    *,
    check_namespace: Any,
    dependencies: list[Any] | None = None,
    responses: dict[int | str, Any] | None = None,
) -> None:
    """Add POST /memstage/query and GET /report; `check_namespace(ns)` raises the app's 400/404 errors;
    `dependencies` (the app's authentication) run before either route."""

    @app.post("/memstage/query", dependencies=dependencies, responses=responses)
    async def query(body: QueryRequest) -> JSONResponse:
        await run_in_threadpool(check_namespace, body.namespace)  # never a store read on the event loop
        # JSON types only already: straight to json.dumps (FastAPI's jsonable_encoder walk of a 20-memory
        # result cost 0.33 ms of a request's ~3.6 ms of server CPU under 32 clients)
        return JSONResponse(await run_in_threadpool(run_served_query, services, body))

    @app.get("/report", response_class=HTMLResponse, dependencies=dependencies, responses=responses)
    async def report(namespace: str | None = Query(default=None, max_length=128)) -> HTMLResponse:
        if namespace is not None:
            await run_in_threadpool(check_namespace, namespace)

        def draw() -> str:
            from memstage.dashboards.report import render_report

            return render_report(services.store, namespace=namespace)

        return HTMLResponse(await run_in_threadpool(draw))
