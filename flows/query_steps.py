"""The query's steps as plain functions: retrieve, answer, record. No Prefect here.

`flows.query` runs them as Prefect tasks of a flow run (against PREFECT_API_URL, so the question
shows in the UI). Without a Prefect server configured, a cold `memstage query` runs them directly
(`run_plain`): a temporary Prefect server would cost seconds to start and its runs vanish with the
process, while the `runs` row written here stays in the store for `memstage report`. Either way a
query leaves one `runs` row (stage 'query': latency, tokens, cached share, answered or not; never
the question's text) and bumps the access counts of the memories it used, through the access
journal (`stores/access_log.py`): a query never waits for the writer lock.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from memstage.runtime.backends import RuntimeConfig
from memstage.runtime.services import services
from memstage.stores import access_log

log = logging.getLogger("memstage")

# An answer that only says the evidence does not hold it: recorded as not answered.
_NOT_ANSWERED = re.compile(
    r"^\W*(i (do not|don't|cannot|can't) (know|tell|say|find|answer)|unknown|not (known|mentioned|stated)"
    r"|(there is |there's )?no (information|memor(y|ies)|evidence))\b",
    re.IGNORECASE,
)


def answered(text: str | None) -> bool:
    """Whether an answer answers: not empty, and not a plain 'I don't know'."""
    return bool(text and text.strip()) and not _NOT_ANSWERED.match(text.strip())


def retrieve_step(
    config: RuntimeConfig, namespace: str, question: str, budget: int, use_ray: bool, as_of: str | None = None
) -> dict[str, Any]:
    """`as_of`: when the question is asked (`tasks.as_of.parse_as_of`'s forms); later memories are left out."""
    from memstage.tasks.as_of import parse_as_of

    dated = {"as_of": parse_as_of(as_of)} if as_of else {}
    return services(config, use_ray=use_ray).retrieve(namespace, question, budget, **dated)


def answer_step(
    config: RuntimeConfig, retrieval: dict[str, Any], engine: str | None, use_ray: bool
) -> dict[str, Any]:
    return services(config, use_ray=use_ray).answer(retrieval, engine=engine)


def query_figures(result: dict[str, Any], *, answer: bool, served_by: str) -> dict[str, Any]:
    """What the `runs` row of a query holds (numbers only: no question, evidence or answer text)."""
    usage = result.get("usage") or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    cached = int(usage.get("cached_tokens") or 0)
    figures: dict[str, Any] = {
        "memories": len(result.get("memories") or []),
        "evidence_tokens": result.get("tokens"),
        "budget": result.get("budget"),
        "retrieve_ms": result.get("latency_ms"),
        "total_ms": result.get("total_ms"),
        "served_by": served_by,
    }
    if answer:
        figures.update(
            prompt_tokens=prompt,
            cached_tokens=cached,
            completion_tokens=int(usage.get("completion_tokens") or 0),
            hit_token_share=round(cached / prompt, 4) if prompt else 0.0,
            ttft_ms=usage.get("ttft_ms"),
            engine=result.get("engine"),
            answered=answered(result.get("answer")),
        )
    return figures


def record_step(
    home: Any,
    namespace: str,
    result: dict[str, Any],
    *,
    answer: bool,
    served_by: str,
    flow_run_id: str | None,
) -> bool:
    """The query's `runs` row and access counts, appended to the access journal (never dropped); False
    when it could not be merged into the store yet (a maintenance run holds it: the next flush does)."""
    from memstage.stores.store import now_utc, to_json
    from memstage.tasks.contract import content_hash

    started = now_utc()
    row = {
        "run_id": content_hash("query", namespace, flow_run_id, started.isoformat(), time.perf_counter_ns()),
        "flow_run_id": flow_run_id,
        "stage": "query",
        "namespace": namespace,
        "started_at": started,
        "duration_s": (result.get("total_ms") or 0.0) / 1000,
        "changed": 0,
        "figures": to_json(query_figures(result, answer=answer, served_by=served_by)),
        "status": "ok",
    }
    memory_ids = [m["memory_id"] for m in result.get("memories") or []]
    log_ = access_log.journal(home)
    log_.append(namespace, memory_ids, row)  # no writer lock: merged in batches (stores.access_log)
    if log_.flusher is None and access_log.flush_now(home) is None:
        # no flusher in this process (a cold CLI query, a deployment's run): merged by the next flush
        log.info("store busy: this query's record waits in %s for the next flush", log_.folder)
        return False
    return True


def run_plain(
    question: str,
    namespace: str,
    budget: int,
    config: RuntimeConfig,
    *,
    engine: str | None = None,
    answer: bool = True,
    served_by: str = "cli",
    as_of: str | None = None,
    record: bool = True,
) -> dict[str, Any]:
    """The query without Prefect (in-process models): the same steps and record as the flow
    (`record=False`: the caller records it, `flows.query.QueryRecorder`)."""
    use_ray = False
    start = time.perf_counter()
    result = retrieve_step(config, namespace, question, budget, use_ray, as_of)
    if answer:
        result.update(answer_step(config, result, engine, use_ray))
    result["total_ms"] = round((time.perf_counter() - start) * 1000, 1)
    if record:
        record_step(config.home, namespace, result, answer=answer, served_by=served_by, flow_run_id=None)
    return result
