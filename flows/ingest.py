"""The ingest flow: a file in, events stored, level-0 memories embedded and indexed, per namespace.

Wiring only (the logic is in tasks/): parsing and every store write run in the flow's process — the
one writer — while the embeddings, the real cost, are computed by the encoder pool
(flows/encoder_pool.py): one long-running Ray task per encoder, on CPU one per core, started before
the input is parsed. flows/index_pipeline.py pipelines the level-0 memories, their embeddings and
the indexes around those encoders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger

from memstage.flows.index_pipeline import early_plan, index_namespaces, plan_indexing
from memstage.runtime.artifacts import publish
from memstage.runtime.backends import RuntimeConfig, flow_run_id, prefect_settings, stage_task, task_runner
from memstage.runtime.encoder_pool import EncoderPool, start_encoders
from memstage.runtime.phases import Phases
from memstage.stores.locks import indexing_lock
from memstage.stores.store import MemoryStore
from memstage.tasks import ingest
from memstage.tasks.contract import StageResult, record_run, timed


@stage_task(name="parse-input", task_run_name="parse {path.name}")
def parse_input(path: Path, fmt: str, namespace: str | None) -> tuple[pa.Table, pa.Table]:
    return ingest.parse_file(path, fmt, namespace, flow_run_id=flow_run_id())


@stage_task(name="commit-events", task_run_name="commit events")
def commit_events(home: Path, events: pa.Table, quarantine: pa.Table) -> StageResult:
    result = ingest.commit_events(MemoryStore(home), events, quarantine)
    logger = get_run_logger()
    logger.info(
        "%d records read: %d new events, %d already stored, %d quarantined",
        result.figures["records"],
        result.figures["events_new"],
        result.figures["events_already_stored"],
        result.figures["quarantined"],
    )
    if result.figures["quarantined"]:  # record numbers only: a reason may quote the record's content
        numbers = [int(n) for n in quarantine.column("record_no").to_pylist()[:20]]
        logger.warning(
            "quarantined records %s of %s (reasons: `memstage stats` / the quarantine table)",
            ", ".join(map(str, numbers)) + (" ..." if result.figures["quarantined"] > 20 else ""),
            Path(str(quarantine.column("source")[0])).name,
        )
    return result


@flow(name="ingest", flow_run_name="ingest {path.name}", log_prints=True)
def ingest_flow(
    path: Path,
    fmt: str = "auto",
    namespace: str | None = None,
    config: RuntimeConfig | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    config = config or RuntimeConfig(home=MemoryStore().home)
    use_ray = config.use_ray(batch=True)
    total = StageResult("ingest", namespace or "")
    phases = Phases()  # where the run's time went: in its result, and printed by the benches
    with timed(total):
        with phases.timed("start_encoders"):
            encoders = start_encoders(config, use_ray=use_ray)  # they start up while the input is parsed
        with encoders:
            committed, namespaces, indexed, parsed = _ingest(
                config, Path(path), fmt, namespace, encoders, phases, show_progress=show_progress
            )
    out = {
        **{k: v for k, v in committed.as_dict().items() if k not in ("stage", "namespace", "duration_s")},
        "stage": "ingest",
        "namespaces": namespaces,
        "indexed": {r.namespace: r.figures for r in indexed},
        "duration_s": round(total.duration_s, 3),
        "turns_per_s": round(parsed / total.duration_s, 1) if total.duration_s else None,
        "runner": "ray" if use_ray else "local",
        "phases": {**phases.as_dict(), "other": round(total.duration_s - sum(phases.seconds.values()), 3)},
        "encoders": phases.encoders,
    }
    publish(
        f"ingest-{Path(path).stem}",
        [committed.as_dict(), *[r.as_dict() for r in indexed]],
        f"Ingested **{Path(path).name}**: {out['events_new']} new events, {out['events_already_stored']} already "
        f"stored, {out['quarantined']} quarantined, into {len(namespaces)} namespace(s) in {out['duration_s']} s.",
    )
    return out


def _ingest(
    config: RuntimeConfig,
    path: Path,
    fmt: str,
    namespace: str | None,
    encoders: EncoderPool,
    phases: Phases,
    *,
    show_progress: bool,
) -> tuple[StageResult, list[str], list[StageResult], int]:
    """The flow's steps: (events committed, their namespaces, each namespace's index run, turns parsed)."""
    store = MemoryStore(config.home)
    with phases.timed("parse"):
        events, quarantine = parse_input(path, fmt, namespace)
    # one ingest embeds at a time per data directory: a concurrent one waits here, then finds
    # the memories made and embedded (no second embedding, no second set of ops rows)
    with indexing_lock(config.home):
        # one store open: the events, then what to embed (the encoders start on it)
        with phases.timed("store_holds"), store.hold():
            with phases.timed("plan"):
                early = early_plan(config, events, encoders)  # a first ingest: the encoders start now
            with phases.timed("commit_events"):
                committed = commit_events(config.home, events, quarantine)
                record_run(store, committed, flow_run_id=flow_run_id())
            namespaces = committed.figures["namespaces"]
            with phases.timed("plan"):
                plan = plan_indexing(config, namespaces, encoders, plan=early, phases=phases)
        indexed = index_namespaces(
            config, namespaces, encoders, show_progress=show_progress, plan=plan, phases=phases
        )
    return committed, namespaces, indexed, events.num_rows


def run_ingest(
    path: Path, fmt: str, namespace: str | None, config: RuntimeConfig, show_progress: bool
) -> dict[str, Any]:
    """Entry point for the CLI and tests: the flow under this process's Prefect API."""
    with prefect_settings(config, use_ray=config.use_ray(batch=True)):
        runnable = ingest_flow.with_options(task_runner=task_runner(config, batch=True))
        return runnable(path, fmt, namespace, config, show_progress)
