"""The query flow: a question in, evidence within a token budget and an answer out.

retrieve -> generate against the long-lived services (warm indexes, loaded generator); accesses are
then recorded for the forget policy. For one ad-hoc question without a cluster the tasks stay in
process (starting Ray would cost more than the question), and the models load in a background
thread while Prefect starts its temporary server.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from memstage.runtime.artifacts import publish
from memstage.runtime.backends import RuntimeConfig, prefect_settings, stage_task, task_runner
from memstage.runtime.services import services
from memstage.stores.store import MemoryStore, StoreLockedError
from memstage.tasks.retrieve import DEFAULT_BUDGET, record_access
from prefect import flow, get_run_logger


@stage_task(name="retrieve", task_run_name="retrieve from {namespace}")
def retrieve(
    config: RuntimeConfig, namespace: str, question: str, budget: int, use_ray: bool
) -> dict[str, Any]:
    return services(config, use_ray=use_ray).retrieve(namespace, question, budget)


@stage_task(name="generate", task_run_name="answer in {namespace}", retries=1, retry_delay_seconds=2)
def generate(
    config: RuntimeConfig, namespace: str, retrieval: dict[str, Any], engine: str, use_ray: bool
) -> dict[str, Any]:
    return services(config, use_ray=use_ray).answer(retrieval, engine=engine)


@stage_task(name="record-access", task_run_name="record access in {namespace}")
def record_memory_access(home: Any, namespace: str, memory_ids: list[str]) -> int:
    try:
        return record_access(MemoryStore(home), namespace, memory_ids)
    except StoreLockedError:  # a maintenance run holds the store: losing one access count is harmless
        get_run_logger().warning("store busy; access counts of this query not recorded")
        return 0


@flow(name="query", flow_run_name="query {namespace}")
def query_flow(
    question: str,
    namespace: str,
    budget: int = DEFAULT_BUDGET,
    config: RuntimeConfig | None = None,
    engine: str | None = None,
    answer: bool = True,
) -> dict[str, Any]:
    config = config or RuntimeConfig(home=MemoryStore().home)
    use_ray = config.use_ray(batch=False)
    start = time.perf_counter()
    result = retrieve.submit(config, namespace, question, budget, use_ray).result()
    if answer:
        result.update(generate.submit(config, namespace, result, engine, use_ray).result())
    record_memory_access(config.home, namespace, [m["memory_id"] for m in result["memories"]])
    result["total_ms"] = round((time.perf_counter() - start) * 1000, 1)
    publish(
        f"query-{namespace}",
        [
            {"memory_id": m["memory_id"], "level": m["level"], "score": m["score"], "text": m["text"][:120]}
            for m in result["memories"]
        ],
        f"**Q:** {question}\n\n**A:** {result.get('answer', '(retrieval only)')}\n\n"
        f"{len(result['memories'])} memories, {result['tokens']} of {budget} tokens.",
    )
    return result


def run_query(
    question: str,
    namespace: str,
    budget: int,
    config: RuntimeConfig,
    *,
    engine: str | None = None,
    answer: bool = True,
) -> dict[str, Any]:
    """Entry point for the CLI: validates the namespace, warms the models while Prefect starts, runs the flow."""
    use_ray = config.use_ray(batch=False)
    MemoryStore(config.home).require_namespace(namespace)
    if not use_ray:
        svc = services(config, use_ray=False)
        warm = threading.Thread(
            target=svc.warm, kwargs={"generator": engine if answer else None}, daemon=True
        )
        warm.start()
    with prefect_settings(config, use_ray=config.use_ray(batch=False)):
        runnable = query_flow.with_options(task_runner=task_runner(config, batch=False))
        return runnable(question, namespace, budget, config, engine, answer)
