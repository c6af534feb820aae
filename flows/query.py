"""The query flow: a question in, evidence within a token budget and an answer out, as a Prefect flow run.

retrieve -> generate against the long-lived services (warm indexes, loaded generator); then the
query is recorded (a `runs` row and the access counts of the memories used, `flows.query_steps`)
and its evidence and answer published as the artifact `query-<namespace>`. Who runs it:
`memstage serve` in its warm process (the CLI's warm path), the `memstage-query` deployment, and
a cold `memstage query` when PREFECT_API_URL names a server (without one, the CLI runs the same
steps without Prefect: `query_steps.run_plain`).
"""

from __future__ import annotations

import atexit
import threading
import time
from typing import Any

from prefect import flow, tags
from pydantic import SecretStr

from memstage.defaults import DEFAULT_BUDGET
from memstage.flows import query_steps as steps
from memstage.runtime.artifacts import publish
from memstage.runtime.backends import RuntimeConfig, flow_run_id, prefect_settings, stage_task, task_runner
from memstage.runtime.services import services
from memstage.settings import get_settings
from memstage.stores.store import MemoryStore


@stage_task(name="retrieve", task_run_name="retrieve from {namespace}")
def retrieve(
    config: RuntimeConfig, namespace: str, question: str, budget: int, use_ray: bool, as_of: str | None = None
) -> dict[str, Any]:
    return steps.retrieve_step(config, namespace, question, budget, use_ray, as_of)


@stage_task(name="generate", task_run_name="answer in {namespace}", retries=1, retry_delay_seconds=2)
def generate(
    config: RuntimeConfig, namespace: str, retrieval: dict[str, Any], engine: str | None, use_ray: bool
) -> dict[str, Any]:
    return steps.answer_step(config, retrieval, engine, use_ray)


@stage_task(name="record-query", task_run_name="record query in {namespace}")
def record(home: Any, namespace: str, result: dict[str, Any], answer: bool, served_by: str) -> bool:
    return steps.record_step(
        home, namespace, result, answer=answer, served_by=served_by, flow_run_id=flow_run_id()
    )


def answer_in_run(
    question: str,
    namespace: str,
    budget: int,
    config: RuntimeConfig,
    engine: str | None = None,
    answer: bool = True,
    served_by: str = "flow",
    as_of: str | None = None,
) -> dict[str, Any]:
    """The flow's body, as tasks of the current flow run (the deployment's run calls it directly, so
    the tasks and the artifact sit on the run a user triggered, not one level down)."""
    use_ray = config.use_ray(batch=False)
    start = time.perf_counter()
    result = retrieve.submit(config, namespace, question, budget, use_ray, as_of).result()
    if answer:
        result.update(generate.submit(config, namespace, result, engine, use_ray).result())
    result["total_ms"] = round((time.perf_counter() - start) * 1000, 1)
    record(config.home, namespace, result, answer, served_by)
    result["flow_run_id"] = flow_run_id()
    publish_query(question, namespace, budget, result, answer)
    return result


def publish_query(question: str, namespace: str, budget: int, result: dict[str, Any], answer: bool) -> None:
    """The query's evidence and answer as the artifact `query-<namespace>` of the current flow run."""
    usage = result.get("usage") or {}
    served = f" (answered by the warm service in {result['total_ms']:.0f} ms)" if result.get("served") else ""
    publish(
        f"query-{namespace}",
        [
            {"memory_id": m["memory_id"], "level": m["level"], "score": m["score"], "text": m["text"][:120]}
            for m in result["memories"]
        ],  # the text column only with MEMSTAGE_ARTIFACT_TEXT=1, like the question and answer
        f"{len(result['memories'])} memories, {result['tokens']} of {budget} evidence tokens; "
        f"{result['total_ms']:.0f} ms"
        + (
            f" ({usage.get('prompt_tokens')} prompt tokens, {usage.get('cached_tokens')} from the KV cache)"
            if answer
            else ""
        )
        + served,
        text_summary=f"**Q:** {question}\n\n**A:** {result.get('answer', '(retrieval only)')}",
    )


@flow(name="query", flow_run_name="query {namespace}")
def query_flow(
    question: SecretStr,  # shown as ********** in Prefect's flow-run parameters: the question stays here
    namespace: str,
    budget: int = DEFAULT_BUDGET,
    config: RuntimeConfig | None = None,
    engine: str | None = None,
    answer: bool = True,
    served_by: str = "flow",
    as_of: str | None = None,
) -> dict[str, Any]:
    config = config or RuntimeConfig(home=MemoryStore().home)
    text = question.get_secret_value() if isinstance(question, SecretStr) else str(question)
    return answer_in_run(text, namespace, budget, config, engine, answer, served_by, as_of)


def run_query(
    question: str,
    namespace: str,
    budget: int,
    config: RuntimeConfig,
    *,
    engine: str | None = None,
    answer: bool = True,
    served_by: str = "cli",
    as_of: str | None = None,
) -> dict[str, Any]:
    """The flow in this process: validates the namespace, warms the models while Prefect starts, runs it
    tagged `namespace:NS` (the tag is on the run from its creation)."""
    use_ray = config.use_ray(batch=False)
    MemoryStore(config.home).require_namespace(namespace)
    if not use_ray:
        svc = services(config, use_ray=False)
        warm = threading.Thread(
            target=svc.warm,
            kwargs={"generator": (engine or get_settings().generator) if answer else None},
            daemon=True,
        )
        warm.start()
    with prefect_settings(config, use_ray=use_ray), tags(f"namespace:{namespace}"):
        runnable = query_flow.with_options(task_runner=task_runner(config, batch=False))
        return runnable(SecretStr(question), namespace, budget, config, engine, answer, served_by, as_of)


# ---- a query the warm service answered, recorded as a flow run after the answer --------------------

_answered: dict[str, tuple[str, dict[str, Any], bool]] = {}  # ticket -> (question, result, answer)


@flow(name="query", flow_run_name="query {namespace}")
def answered_query_flow(
    ticket: str, namespace: str, budget: int, home: str, served_by: str = "serve"
) -> str | None:
    """A query `memstage serve` has already answered (retrieve and generate ran in its warm process, with
    no Prefect call on the way): its `runs` row, carrying this flow run's id, and its `query-<namespace>`
    artifact. The question, evidence and answer reach the run through `ticket`, never as parameters,
    so Prefect's parameter record holds no text."""
    question, result, answer = _answered.pop(ticket)
    record(home, namespace, result, answer, served_by)
    result["flow_run_id"] = flow_run_id()
    publish_query(question, namespace, budget, result, answer)
    return result["flow_run_id"]


class QueryRecorder:
    """Records answered queries as Prefect flow runs on one background thread, in order, after each
    answer has gone back (a flow run's API calls cost 1-4 s on the busy 2-core machine, measured: the
    warm path no longer waits for them). When Prefect fails, or the process exits with records still
    queued, the query is recorded in the store without a flow run: no query goes unrecorded."""

    def __init__(self, home: Any) -> None:
        import queue

        self.home = str(home)
        self.queue: queue.Queue[tuple[str, str, int, str] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="memstage-query-runs", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def submit(
        self, question: str, namespace: str, budget: int, result: dict[str, Any], answer: bool
    ) -> None:
        import uuid

        ticket = uuid.uuid4().hex
        _answered[ticket] = (question, dict(result), answer)
        self.queue.put((ticket, namespace, budget, str(result.get("served_by") or "serve")))

    def _work(self) -> None:
        import logging

        while (item := self.queue.get()) is not None:
            ticket, namespace, budget, served_by = item
            try:
                with prefect_settings(), tags(f"namespace:{namespace}", "served"):
                    answered_query_flow(ticket, namespace, budget, self.home, served_by)
            except Exception as exc:  # noqa: BLE001 - the Prefect server is away: keep the store's record
                logging.getLogger("memstage").warning("recording the query as a Prefect run failed: %s", exc)
                self._plain(ticket, namespace, served_by)

    def _plain(self, ticket: str, namespace: str, served_by: str) -> None:
        pending = _answered.pop(ticket, None)
        if pending is not None:
            steps.record_step(
                self.home, namespace, pending[1], answer=pending[2], served_by=served_by, flow_run_id=None
            )

    def close(self, timeout_s: float = 10.0) -> None:
        """Let queued runs finish for up to `timeout_s`; record what is left without Prefect."""
        self.queue.put(None)
        self.thread.join(timeout_s)
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is not None:
                self._plain(item[0], item[1], item[3])
