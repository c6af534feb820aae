"""The ingest flow: a file in, events stored, level-0 memories embedded and indexed, per namespace.

Wiring only (the logic is in tasks/): parsing and every store write run in the flow's process — the
one writer — while the embedding batches, the real cost, run as coarse Ray tasks against the
long-lived encoder in the services actor.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger

from flows.artifacts import publish
from flows.progress import Progress
from flows.runtime import RuntimeConfig, flow_run_id, prefect_settings, stage_task, task_runner
from flows.services import services
from stores.store import MemoryStore
from tasks import index, ingest
from tasks.contract import StageResult, record_run, timed

EMBED_BATCH = 1024  # texts per Ray task: about 10 s of encoder time on 2 cores, far above the 0.2 s task cost
EMBED_IN_FLIGHT = 2  # batches queued at the encoder: one encoding, the next already waiting


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
    for reason in result.figures["quarantine_reasons"][:5]:
        logger.warning("quarantined: %s", reason)
    return result


@stage_task(name="level0-memories", task_run_name="level-0 memories of {namespace}")
def make_level0(config: RuntimeConfig, namespace: str) -> StageResult:
    # Tokens are counted here, in the flow's process (a light tokenizer), not by the services actor:
    # it is busy encoding the previous namespace, and this step should overlap with that.
    return index.materialise_level0(
        MemoryStore(config.home),
        namespace,
        count_tokens=services(config, use_ray=False).count_tokens,
        flow_run_id=flow_run_id(),
    )


@stage_task(
    name="embed-batch",
    task_run_name="embed {namespace} batch {batch_no}",
    retries=2,
    retry_delay_seconds=[2, 10],
)
def embed_batch(
    config: RuntimeConfig, namespace: str, batch_no: int, ids: list[str], texts: list[str], use_ray: bool
) -> pa.Table:
    return index.embeddings_table(ids, services(config, use_ray=use_ray).encode(texts))


@stage_task(name="build-indexes", task_run_name="indexes of {namespace}")
def build_indexes(home: Path, namespace: str) -> StageResult:
    return index.build_indexes(MemoryStore(home), namespace, flow_run_id=flow_run_id())


def index_namespaces(
    config: RuntimeConfig, namespaces: list[str], *, use_ray: bool, show_progress: bool
) -> list[StageResult]:
    """Level-0 memories, embeddings and indexes for each namespace, pipelined around the encoder.

    The encoder is the real cost, so it must never wait on the flow: EMBED_IN_FLIGHT batches are
    queued at it at any time, and while it works the flow process materialises the next namespace's
    level-0 memories, commits finished batches and builds the indexes of finished namespaces. A
    bounded queue, not everything at once: each submitted task that waits on the actor frees its
    Ray CPU, and Ray starts a new worker process (seconds of imports, stolen from the encoder) for
    the next one.
    """
    store = MemoryStore(config.home)
    created: dict[str, StageResult] = {}
    built: dict[str, StageResult] = {}
    embedded = dict.fromkeys(namespaces, 0)
    batches_left = dict.fromkeys(namespaces, 0)
    in_flight: deque[tuple[str, Any]] = deque()

    with Progress("embedding", 0, enabled=show_progress) as bar:

        def settle_oldest() -> None:
            ns, future = in_flight.popleft()
            emb = future.result()
            batches_left[ns] -= 1
            with store.hold():  # one connection for the step's reads and writes (see MemoryStore.hold)
                embedded[ns] += index.commit_embeddings(store, ns, emb)
                if batches_left[ns] == 0:
                    built[ns] = build_indexes(config.home, ns)
            bar.advance(emb.num_rows)

        for ns in namespaces:
            with store.hold():
                created[ns] = make_level0(config, ns)
                ids, texts = index.pending_embeddings(store, ns)
                starts = range(0, len(ids), EMBED_BATCH)
                batches_left[ns] = len(starts)
                if not starts:  # nothing to embed; a stage may still have changed what is indexed
                    built[ns] = build_indexes(config.home, ns)
            bar.add_total(len(ids))
            for b, start in enumerate(starts):
                while len(in_flight) >= EMBED_IN_FLIGHT:
                    settle_oldest()
                sl = slice(start, start + EMBED_BATCH)
                in_flight.append((ns, embed_batch.submit(config, ns, b, ids[sl], texts[sl], use_ray)))
        while in_flight:
            settle_oldest()

    results = []
    for ns in namespaces:
        r = StageResult("index", ns)
        r.changed = created[ns].changed + embedded[ns] + built[ns].changed
        r.duration_s = created[ns].duration_s + built[ns].duration_s
        r.figures = {
            "level0_created": created[ns].changed,
            "embedded": embedded[ns],
            "indexes_rebuilt": built[ns].changed,
            "memories_indexed": built[ns].figures.get("memories_indexed", 0),
        }
        results.append(r)
    return results


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
    with timed(total):
        events, quarantine = parse_input(Path(path), fmt, namespace)
        committed = commit_events(config.home, events, quarantine)
        namespaces = committed.figures["namespaces"]
        indexed = index_namespaces(config, namespaces, use_ray=use_ray, show_progress=show_progress)
    store = MemoryStore(config.home)
    run_id = flow_run_id()
    with store.hold():
        record_run(store, committed, flow_run_id=run_id)
        for r in indexed:
            record_run(store, r, flow_run_id=run_id)
    out = {
        **{k: v for k, v in committed.as_dict().items() if k not in ("stage", "namespace", "duration_s")},
        "stage": "ingest",
        "namespaces": namespaces,
        "indexed": {r.namespace: r.figures for r in indexed},
        "duration_s": round(total.duration_s, 3),
        "turns_per_s": round(events.num_rows / total.duration_s, 1) if total.duration_s else None,
        "runner": "ray" if use_ray else "local",
    }
    publish(
        f"ingest-{Path(path).stem}",
        [committed.as_dict(), *[r.as_dict() for r in indexed]],
        f"Ingested **{Path(path).name}**: {out['events_new']} new events, {out['events_already_stored']} already "
        f"stored, {out['quarantined']} quarantined, into {len(namespaces)} namespace(s) in {out['duration_s']} s.",
    )
    return out


def run_ingest(
    path: Path, fmt: str, namespace: str | None, config: RuntimeConfig, show_progress: bool
) -> dict[str, Any]:
    """Entry point for the CLI and tests: the flow under this process's Prefect API."""
    with prefect_settings(config, use_ray=config.use_ray(batch=True)):
        runnable = ingest_flow.with_options(task_runner=task_runner(config, batch=True))
        return runnable(path, fmt, namespace, config, show_progress)
