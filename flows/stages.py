"""The maintenance stages as Prefect flows: one flow per stage, and `maintain_flow`, the chain of them.

Wiring only (the logic is in tasks/): each stage runs as one coarse task per namespace (a Ray task
under the Ray runner) that computes and commits through the store's writer lock, using the encoder
and tokenizer of the long-lived services actor. Every stage flow records a `runs` row per namespace
and publishes a table artifact of its figures. `maintain_flow` runs compress -> consolidate ->
update -> index -> forget as subflows; a stage that fails is retried once, reported, and the
stages after it still run.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from memstage.flows.index_pipeline import index_namespaces
from memstage.runtime.artifacts import publish
from memstage.runtime.backends import RuntimeConfig, flow_run_id, prefect_settings, stage_task, task_runner
from memstage.runtime.encoder_pool import start_encoders
from memstage.runtime.services import services
from memstage.stores.store import MemoryStore
from memstage.tasks import compress, consolidate, forget, index, update
from memstage.tasks.contract import StageResult, record_run, record_runs, timed
from prefect import flow, get_run_logger

STAGES = ("compress", "consolidate", "update", "index", "forget")
LOCK_WAIT_S = 300.0  # stages of different namespaces run side by side and take turns at the writer lock


def _store(home: Path) -> MemoryStore:
    return MemoryStore(home, lock_timeout_s=LOCK_WAIT_S)


@stage_task(name="compress", task_run_name="compress {namespace}", retries=1, retry_delay_seconds=[2])
def compress_task(config: RuntimeConfig, namespace: str, use_ray: bool) -> StageResult:
    svc = services(config, use_ray=use_ray)
    store = _store(config.home)
    # Level-0 memories of events not materialised yet (the index stage does this too; both are no-ops when done).
    made = index.materialise_level0(
        store, namespace, count_tokens=svc.count_tokens, flow_run_id=flow_run_id()
    )
    result = compress.run_compress(store, namespace, count_tokens=svc.count_tokens, flow_run_id=flow_run_id())
    result.changed += made.changed
    result.figures["level0_created"] = made.changed
    return result


@stage_task(name="consolidate", task_run_name="consolidate {namespace}", retries=1, retry_delay_seconds=[2])
def consolidate_task(config: RuntimeConfig, namespace: str, use_ray: bool) -> StageResult:
    svc = services(config, use_ray=use_ray)
    return consolidate.run_consolidate(
        _store(config.home),
        namespace,
        embed=svc.encode,
        count_tokens=svc.count_tokens,
        flow_run_id=flow_run_id(),
    )


@stage_task(name="update", task_run_name="update {namespace}", retries=1, retry_delay_seconds=[2])
def update_task(config: RuntimeConfig, namespace: str, use_ray: bool) -> StageResult:
    svc = services(config, use_ray=use_ray)
    return update.run_update(_store(config.home), namespace, embed=svc.encode, flow_run_id=flow_run_id())


@stage_task(name="forget", task_run_name="forget {namespace}", retries=1, retry_delay_seconds=[2])
def forget_task(config: RuntimeConfig, namespace: str, use_ray: bool) -> StageResult:
    svc = services(config, use_ray=use_ray)
    store = _store(config.home)
    result = forget.run_forget(store, namespace, embed=svc.encode, flow_run_id=flow_run_id())
    if result.figures.get(
        "archived"
    ):  # archived memories must leave the indexes now, not at the next index run
        index.build_indexes(store, namespace, flow_run_id=flow_run_id())
    return result


@stage_task(name="forget-hard", task_run_name="hard forget in {namespace}")
def forget_hard_task(config: RuntimeConfig, namespace: str, use_ray: bool, request: str) -> StageResult:
    # The subject travels in a request file, never as a task or flow parameter: Prefect stores those
    # (and shows them in its UI), which would keep the very text being deleted outside the data dir.
    path = Path(request)
    selector = json.loads(path.read_text())
    path.unlink()  # before the deletion's byte search of the data directory
    if selector.get("before"):
        selector["before"] = parse_date(selector["before"])
    svc = services(config, use_ray=use_ray)
    return forget.forget_hard(
        _store(config.home), namespace, embed=svc.encode, flow_run_id=flow_run_id(), **selector
    )


TASKS = {
    "compress": compress_task,
    "consolidate": consolidate_task,
    "update": update_task,
    "forget": forget_task,
}


def _finish(
    stage: str, results: list[StageResult], failed: dict[str, str], home: Path, *, recorded: bool = False
) -> list[dict[str, Any]]:
    """Record runs (unless the stage has: `recorded`), publish the artifact, and fail the flow run
    (after recording) if any namespace failed."""
    store = _store(home)
    run_id = flow_run_id()
    if not recorded:
        record_runs(store, results, flow_run_id=run_id)
    for ns, err in failed.items():
        record_run(store, StageResult(stage, ns, figures={"error": err}), flow_run_id=run_id, status="failed")
    rows = [r.as_dict() for r in results] + [
        {"stage": stage, "namespace": ns, "error": e} for ns, e in failed.items()
    ]
    changed = sum(r.changed for r in results)
    publish(
        f"{stage}-{run_id or 'local'}",
        rows,
        f"**{stage}** over {len(rows)} namespace(s): {changed} rows changed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + "\n\n"
        + "\n".join(
            f"- {r['namespace']}: "
            + ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("stage", "namespace"))
            for r in rows
        ),
    )
    if failed:
        raise RuntimeError(f"{stage} failed for {', '.join(f'{ns} ({e})' for ns, e in failed.items())}")
    return rows


def _run_stage(
    stage: str, namespaces: list[str], config: RuntimeConfig, use_ray: bool
) -> list[dict[str, Any]]:
    logger = get_run_logger()
    if stage == "index":
        results = index_namespaces(
            config, namespaces, start_encoders(config, use_ray=use_ray), show_progress=False
        )
        return _finish(stage, results, {}, config.home, recorded=True)
    futures = [(ns, TASKS[stage].submit(config, ns, use_ray)) for ns in namespaces]
    results, failed = [], {}
    for ns, fut in futures:
        try:
            r = fut.result()
            results.append(r)
            logger.info("%s %s: %s", stage, ns, r.as_dict())
        except Exception as exc:  # noqa: BLE001 - one namespace failing does not hide the others' results
            failed[ns] = f"{type(exc).__name__}: {exc}"
            logger.error("%s %s failed: %s", stage, ns, failed[ns])
    return _finish(stage, results, failed, config.home)


def _make_stage_flow(stage: str) -> Any:
    @flow(name=f"stage-{stage}", flow_run_name=f"{stage} {{namespaces}}", retries=1, retry_delay_seconds=2)
    def stage_flow(
        namespaces: list[str], config: RuntimeConfig, use_ray: bool = False
    ) -> list[dict[str, Any]]:
        return _run_stage(stage, namespaces, config, use_ray)

    stage_flow.__name__ = f"{stage}_flow"
    return stage_flow


compress_flow = _make_stage_flow("compress")
consolidate_flow = _make_stage_flow("consolidate")
update_flow = _make_stage_flow("update")
index_flow = _make_stage_flow("index")
forget_flow = _make_stage_flow("forget")
STAGE_FLOWS = {
    "compress": compress_flow,
    "consolidate": consolidate_flow,
    "update": update_flow,
    "index": index_flow,
    "forget": forget_flow,
}


@flow(name="maintain", flow_run_name="maintain {namespaces}")
def maintain_flow(namespaces: list[str], config: RuntimeConfig, use_ray: bool = False) -> dict[str, Any]:
    """Every stage in order over the namespaces; a failed stage is reported and the next one still runs."""
    report: dict[str, Any] = {"stage": "maintain", "namespaces": namespaces, "stages": {}}
    total = StageResult("maintain", ",".join(namespaces))
    with timed(total):
        for stage in STAGES:
            result = StageResult(stage, "")
            with timed(result):
                # a subflow runs on its own task runner, not its parent's: give it the same one
                runnable = STAGE_FLOWS[stage].with_options(task_runner=task_runner(config, batch=use_ray))
                state = runnable(namespaces, config, use_ray, return_state=True)
            if state.is_completed():
                rows = state.result()
                report["stages"][stage] = {
                    "status": "ok",
                    "changed": sum(r.get("changed", 0) for r in rows),
                    "duration_s": round(result.duration_s, 3),
                    "namespaces": rows,
                }
            else:
                report["stages"][stage] = {
                    "status": "failed",
                    "error": state.message,
                    "duration_s": round(result.duration_s, 3),
                }
    report["failed"] = [s for s, r in report["stages"].items() if r["status"] != "ok"]
    report["duration_s"] = round(total.duration_s, 3)
    publish(
        "maintain",
        [
            {"stage": s, "status": r["status"], "changed": r.get("changed"), "duration_s": r["duration_s"]}
            for s, r in report["stages"].items()
        ],
        f"maintain over {len(namespaces)} namespace(s) in {report['duration_s']} s; failed: {report['failed'] or 'none'}",
    )
    return report


@flow(name="forget-hard", flow_run_name="hard forget in {namespace}")
def forget_hard_flow(
    namespace: str, request: str, config: RuntimeConfig, use_ray: bool = False
) -> dict[str, Any]:
    """Hard deletion as its own flow run, so the request is on record (without the subject's text)."""
    result = forget_hard_task(config, namespace, use_ray, request)
    return _finish("forget-hard", [result], {}, config.home)[0]


# ---- entry points for the CLI and tests ---------------------------------------------------------


def resolve_namespaces(config: RuntimeConfig, namespace: str | None) -> list[str]:
    store = MemoryStore(config.home)
    if namespace:
        return [store.require_namespace(namespace)]
    found = store.namespaces()
    if not found:
        raise ValueError(f"the store at {store.home} is empty: run `memstage ingest` first")
    return found


def run_stage(stage: str, namespace: str | None, config: RuntimeConfig) -> dict[str, Any]:
    if stage not in STAGE_FLOWS:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    namespaces = resolve_namespaces(config, namespace)
    use_ray = config.use_ray(batch=True)
    with prefect_settings(config, use_ray=use_ray):
        rows = STAGE_FLOWS[stage].with_options(task_runner=task_runner(config, batch=True))(
            namespaces, config, use_ray
        )
    if len(rows) == 1:
        return rows[0]
    return {"stage": stage, "changed": sum(r.get("changed", 0) for r in rows), "namespaces": rows}


def run_maintain(namespace: str | None, config: RuntimeConfig) -> dict[str, Any]:
    namespaces = resolve_namespaces(config, namespace)
    use_ray = config.use_ray(batch=True)
    with prefect_settings(config, use_ray=use_ray):
        return maintain_flow(namespaces, config, use_ray)


def run_forget_hard(namespace: str, selector: dict[str, Any], config: RuntimeConfig) -> dict[str, Any]:
    store = MemoryStore(config.home)
    store.require_namespace(namespace)
    use_ray = config.use_ray(batch=True)
    request = config.home / f".forget-request-{uuid.uuid4().hex}.json"
    fd = os.open(request, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(selector, f, default=lambda d: d.isoformat())
    try:
        with prefect_settings(config, use_ray=use_ray):
            runnable = forget_hard_flow.with_options(task_runner=task_runner(config, batch=True))
            return runnable(namespace, str(request), config, use_ray)
    finally:
        request.unlink(missing_ok=True)


def parse_date(text: str) -> datetime:
    """'2023-06-01' or an ISO timestamp -> an aware UTC datetime."""
    from datetime import UTC

    when = datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=UTC)
