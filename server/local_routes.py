"""`memstage serve`'s routes for its own command line and its operator: a warm query, and the report.

POST /memstage/query answers `memstage query` / `memstage retrieve` from the models and indexes the
server keeps loaded. With PREFECT_API_URL set in the server's environment it runs the query flow
(a flow run in that server's UI, tagged `namespace:NS`, with its `query-NS` artifact); without, it
runs the same steps without Prefect. Either way the query is recorded in the store's `runs` table.
GET /report draws `memstage report` (all namespaces, or `?namespace=NS`) and serves the page, so the
Prefect UI can link an http:// URL instead of a file on the worker. Both sit behind whatever
authentication the app applies to its other routes.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse
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
    """One query in this warm process: the query flow when a Prefect server is configured, else its steps."""
    from memstage.runtime.backends import RuntimeConfig

    config = RuntimeConfig(home=services.store.home, runner="local")
    api = os.environ.get("PREFECT_API_URL")
    if api:
        from prefect import tags

        from memstage.flows.query import query_flow
        from memstage.runtime.backends import prefect_settings

        with prefect_settings(config), tags(f"namespace:{body.namespace}", "served"):
            from pydantic import SecretStr

            result = query_flow(
                SecretStr(body.question),  # shown as ********** in Prefect's flow-run parameters
                body.namespace,
                body.budget,
                config,
                body.engine,
                body.answer,
                "serve",
                body.as_of,
            )
    else:
        from memstage.flows.query_steps import run_plain

        result = run_plain(
            body.question, body.namespace, body.budget, config,
            engine=body.engine, answer=body.answer, served_by="serve", as_of=body.as_of,
        )  # fmt: skip
    result["served"] = {"pid": os.getpid(), "prefect_api_url": api, "flow_run_id": result.get("flow_run_id")}
    return result


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
    async def query(body: QueryRequest) -> dict[str, Any]:
        check_namespace(body.namespace)
        return await run_in_threadpool(run_served_query, services, body)

    @app.get("/report", response_class=HTMLResponse, dependencies=dependencies, responses=responses)
    async def report(namespace: str | None = Query(default=None, max_length=128)) -> HTMLResponse:
        if namespace is not None:
            check_namespace(namespace)

        def draw() -> str:
            from memstage.dashboards.report import render_report

            return render_report(services.store, namespace=namespace)

        return HTMLResponse(await run_in_threadpool(draw))
