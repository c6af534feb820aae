"""The maintenance stages as Prefect flows: one flow per stage, and `maintain_flow`, the chain of them.

Wiring only (the logic is in tasks/): each stage runs as one coarse task per namespace (a Ray task
under the Ray runner) over an Arrow snapshot of the namespace in a scratch store of the worker's
own, using the encoder and tokenizer of the long-lived services actor; the flow's process commits
the changes it returns, in batches (flows/fanout.py), so workers need no data directory. Every
stage flow records a `runs` row per namespace and publishes a table artifact of its figures.
`maintain_flow` runs compress -> consolidate -> update -> index -> forget as subflows; a namespace
whose task fails is retried once (that task alone), a stage that still fails is reported, and the
stages after it still run; the report gives namespaces/s and turns/s.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from memstage.flows.fanout import fan_out
from memstage.flows.index_pipeline import index_namespaces
from memstage.runtime.artifacts import figures_text, namespaces_label, publish, run_key
from memstage.runtime.backends import RuntimeConfig, flow_run_id, prefect_settings, stage_task, task_runner
from memstage.runtime.encoder_pool import start_encoders
from memstage.runtime.services import services
from memstage.stores.access_log import flush_now
from memstage.stores.locks import indexing_lock
from memstage.stores.queries import event_count
from memstage.stores.store import MemoryStore
from memstage.tasks import forget
from memstage.tasks.contract import StageResult, record_run, record_runs, timed
from memstage.tasks.registry import STAGES, get_stage

# The index stage over this many namespaces or more runs like the others (batches of namespaces on
# the workers, each embedding with its own encoder and building the indexes): its encoder pool path
# builds every namespace's indexes in the flow's process, one after another, which many small
# namespaces turn into the whole cost; with fewer, the pool keeps every core encoding at once.
INDEX_FAN_OUT_FROM = 64
SHOWN = 50  # namespaces listed in a stage's artifact; the rest are counted (10k rows is no report)
LOCK_WAIT_S = 300.0  # the flow's commits wait this long for another writer (a query flush, another flow)


def _store(home: Path) -> MemoryStore:
    return MemoryStore(home, lock_timeout_s=LOCK_WAIT_S)


def _read_request(request: str) -> dict[str, Any]:
    # A forget's subject travels in a request file, never as a task or flow parameter: Prefect stores
    # those (and shows them in its UI), which would keep the very text being deleted outside the data dir.
    path = Path(request)
    selector = json.loads(path.read_text())
    path.unlink()  # before the deletion's byte search of the data directory
    if selector.get("before"):
        selector["before"] = parse_date(selector["before"])
    return selector


@stage_task(name="forget-hard", task_run_name="hard forget in {namespace}")
def forget_hard_task(config: RuntimeConfig, namespace: str, use_ray: bool, request: str) -> StageResult:
    selector = _read_request(request)
    svc = services(config, use_ray=use_ray)
    return forget.forget_hard(
        _store(config.home), namespace, embed=svc.encode, flow_run_id=flow_run_id(), **selector
    )


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
    shown = [{"stage": stage, "namespace": ns, "error": e} for ns, e in failed.items()][:SHOWN]
    shown += [r.as_dict() for r in results[: SHOWN - len(shown)]]
    publish(
        run_key(stage, [str(r["namespace"]) for r in rows]),
        shown,
        f"**{stage}** over {len(rows)} namespace(s): {changed} rows changed"
        + (f"; failed: {', '.join(list(failed)[:SHOWN])}" if failed else "")
        + "\n\n"
        + "\n".join(
            f"- {r['namespace']}: "
            + ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("stage", "namespace"))
            for r in shown
        )
        + (
            f"\n- ... and {len(rows) - len(shown)} more (the `runs` table has them all)"
            if len(rows) > len(shown)
            else ""
        ),
    )
    if failed:
        raise RuntimeError(f"{stage} failed for {', '.join(f'{ns} ({e})' for ns, e in failed.items())}")
    return rows


def _run_stage(
    stage: str, namespaces: list[str], config: RuntimeConfig, use_ray: bool
) -> list[dict[str, Any]]:
    logger = get_run_logger()
    if stage == "forget":  # its 'use' signal: the queries' access counts, merged from their journal first
        flush_now(config.home, lock_timeout_s=LOCK_WAIT_S)
    if get_stage(stage).uses_encoder_pool and len(namespaces) < INDEX_FAN_OUT_FROM:
        with indexing_lock(config.home):  # never beside an ingest's embedding run
            results = index_namespaces(
                config, namespaces, start_encoders(config, use_ray=use_ray), show_progress=False
            )
        return _finish(stage, results, {}, config.home, recorded=True)
    with indexing_lock(config.home) if get_stage(stage).uses_encoder_pool else contextlib.nullcontext():
        done = fan_out(stage, namespaces, config, use_ray, _store(config.home), log=logger)
    rate = done.throughput(len(namespaces))
    logger.info("%s: %s namespaces/s, %s turns/s over %d batch(es)", stage, rate["namespaces_per_s"],
                rate["turns_per_s"], rate["batches"])  # fmt: skip
    return _finish(stage, done.results, done.failed, config.home)


def _make_stage_flow(stage: str) -> Any:
    @flow(
        name=f"stage-{stage}",
        # no flow-level retries: a failed namespace's task is retried alone (flows/fanout.py); a
        # retried flow run re-ran every namespace and recorded their `runs` rows twice
        flow_run_name=lambda: f"{stage} {namespaces_label(flow_run.parameters['namespaces'])}",
    )
    def stage_flow(
        namespaces: list[str], config: RuntimeConfig, use_ray: bool = False
    ) -> list[dict[str, Any]]:
        return _run_stage(stage, namespaces, config, use_ray)

    stage_flow.__name__ = f"{stage}_flow"
    stage_flow.__doc__ = f"The {stage} stage over the namespaces: {get_stage(stage).summary}."
    return stage_flow


STAGE_FLOWS = {s.name: _make_stage_flow(s.name) for s in STAGES}


@flow(
    name="maintain", flow_run_name=lambda: "maintain " + namespaces_label(flow_run.parameters["namespaces"])
)
def maintain_flow(namespaces: list[str], config: RuntimeConfig, use_ray: bool = False) -> dict[str, Any]:
    """Every stage in order over the namespaces; a failed stage is reported and the next one still runs."""
    report: dict[str, Any] = {"stage": "maintain", "namespaces": namespaces, "stages": {}}
    total = StageResult("maintain", ",".join(namespaces))
    with timed(total):
        for stage in (s.name for s in STAGES):
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
    turns = event_count(_store(config.home), namespaces)
    report["throughput"] = {
        "namespaces_per_s": round(len(namespaces) / total.duration_s, 3) if total.duration_s else None,
        "turns_per_s": round(turns / total.duration_s, 1) if total.duration_s else None,
        "turns": turns,
    }
    publish(
        run_key("maintain", namespaces),
        [
            {
                "stage": s,
                "status": r["status"],
                "changed": r.get("changed"),
                "duration_s": r["duration_s"],
                "what": figures_text(r.get("namespaces", []), skip=("changed", "duration_s"))
                or r.get("error"),
            }
            for s, r in report["stages"].items()
        ],  # fmt: skip
        f"**maintain {namespaces_label(namespaces)}** in {report['duration_s']} s "
        f"({report['throughput']['namespaces_per_s']} namespaces/s, {report['throughput']['turns_per_s']} turns/s); failed: "
        f"{', '.join(report['failed']) or 'none'}\n\n"
        + "\n".join(
            f"- **{s}** {r['status']}, {r.get('changed', 0)} rows changed in {r['duration_s']} s"
            + (
                f": {what}"
                if (what := figures_text(r.get("namespaces", []), skip=("changed", "duration_s")))
                else ""
            )
            + (f" ({r['error']})" if r.get("error") else "")
            for s, r in report["stages"].items()
        ),
    )
    return report


@flow(name="forget-hard", flow_run_name="hard forget in {namespace}")
def forget_hard_flow(
    namespace: str, request: str, config: RuntimeConfig, use_ray: bool = False
) -> dict[str, Any]:
    """Hard deletion as its own flow run, so the request is on record (without the subject's text).

    Then the same subject out of Prefect (runtime/prefect_scrub.py) and its database byte-checked;
    `subject_remains` says whether any check (data directory, Prefect database, Prefect logs) found it."""
    subject = json.loads(Path(request).read_text()).get("subject")  # the task deletes the file
    result = forget_hard_task(config, namespace, use_ray, request)
    if subject:
        from memstage.runtime.prefect_scrub import forget_in_prefect

        prefect_figures = forget_in_prefect(subject)
        result.figures["prefect"] = prefect_figures
        result.figures["subject_remains"] = bool(
            result.figures.get("files_still_containing_subject") or prefect_figures.pop("subject_remains")
        )
    return _finish("forget-hard", [result], {}, config.home)[0]


@flow(name="forget-soft", flow_run_name="forget in {namespace}")
def forget_soft_flow(namespace: str, request: str, config: RuntimeConfig) -> dict[str, Any]:
    """Soft forgetting (archive, undoable) as a flow run; the selector travels in a request file."""
    selector = _read_request(request)
    result = forget.forget_soft(_store(config.home), namespace, flow_run_id=flow_run_id(), **selector)
    return _finish("forget-soft", [result], {}, config.home)[0]


@flow(name="restore", flow_run_name="restore in {namespace}")
def restore_flow(namespace: str, memory_ids: list[str], config: RuntimeConfig) -> dict[str, Any]:
    """Undo soft forgetting of the given memories (from their ops), as a flow run."""
    result = forget.restore(_store(config.home), namespace, memory_ids, flow_run_id=flow_run_id())
    return _finish("restore", [result], {}, config.home)[0]


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
    get_stage(stage)  # a clear error for an unknown name
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


def _write_request(config: RuntimeConfig, selector: dict[str, Any]) -> Path:
    request = config.home / f".forget-request-{uuid.uuid4().hex}.json"
    fd = os.open(request, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(selector, f, default=lambda d: d.isoformat())
    return request


def run_forget(
    namespace: str, selector: dict[str, Any], config: RuntimeConfig, *, hard: bool
) -> dict[str, Any]:
    """Forget what `selector` matches: archived (soft, undoable) or deleted everywhere (hard)."""
    MemoryStore(config.home).require_namespace(namespace)
    use_ray = config.use_ray(batch=True) and hard  # soft forgetting needs no encoder: in-process
    request = _write_request(config, selector)
    try:
        with prefect_settings(config, use_ray=use_ray):
            if hard:
                runnable = forget_hard_flow.with_options(task_runner=task_runner(config, batch=True))
                return runnable(namespace, str(request), config, use_ray)
            return forget_soft_flow(namespace, str(request), config)
    finally:
        request.unlink(missing_ok=True)


def run_restore(namespace: str, memory_ids: list[str], config: RuntimeConfig) -> dict[str, Any]:
    MemoryStore(config.home).require_namespace(namespace)
    with prefect_settings(config, use_ray=False):
        return restore_flow(namespace, memory_ids, config)


def parse_date(text: str) -> datetime:
    """'2023-06-01' or an ISO timestamp -> an aware UTC datetime."""
    from datetime import UTC

    when = datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=UTC)
