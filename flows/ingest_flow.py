"""The ingest flow: a file in, events stored, level-0 memories embedded and indexed, per namespace.

Wiring only (the logic is in tasks/): parsing and every store write run in the flow's process — the
one writer — while the embeddings, the real cost, are computed by the encoder pool
(flows/encoder_pool.py): one long-running Ray task per encoder, on CPU one per core.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger

from flows.artifacts import publish
from flows.encoder_pool import WAIT_S, EncoderPool, start_encoders
from flows.progress import Progress
from flows.runtime import RuntimeConfig, flow_run_id, prefect_settings, stage_task, task_runner
from flows.services import services
from stores.store import MemoryStore
from tasks import index, ingest
from tasks.contract import StageResult, record_run, timed

LEVEL0_GROUP = 8  # namespaces per level-0 task run after the first
# A commit opens the store (tens of ms) and builds the indexes of the namespaces it completes in one
# task run (tens of ms of Prefect, in the flow and in the server), so finished chunks gather until
# BUILD_GROUP namespaces are complete, COMMIT_ROWS embeddings wait, or nothing else is outstanding.
BUILD_GROUP = 2
COMMIT_ROWS = 2048


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


@stage_task(name="level0-memories", task_run_name="level-0 memories of {label}")
def make_level0(config: RuntimeConfig, namespaces: list[str], label: str) -> list[StageResult]:
    # Tokens are counted here, in the flow's process (a light tokenizer), while the encoders work on
    # the previous namespaces' chunks.
    store, count_tokens = MemoryStore(config.home), services(config, use_ray=False).count_tokens
    return [
        index.materialise_level0(store, ns, count_tokens=count_tokens, flow_run_id=flow_run_id())
        for ns in namespaces
    ]


def level0_groups(namespaces: list[str]) -> list[list[str]]:
    """The first namespace alone, so the encoders start on it at once, then groups of LEVEL0_GROUP:
    one task run per group instead of per namespace (a task run costs the flow and the server)."""
    if not namespaces:
        return []
    rest = namespaces[1:]
    return [namespaces[:1]] + [rest[i : i + LEVEL0_GROUP] for i in range(0, len(rest), LEVEL0_GROUP)]


@stage_task(name="build-indexes", task_run_name="indexes of {label}")
def build_indexes(home: Path, namespaces: list[str], label: str) -> list[StageResult]:
    store = MemoryStore(home)
    return [index.build_indexes(store, ns, flow_run_id=flow_run_id()) for ns in namespaces]


def build_all(home: Path, namespaces: list[str]) -> dict[str, StageResult]:
    """One task run for the namespaces a step completed (a task run costs the server and the flow)."""
    if not namespaces:
        return {}
    return dict(zip(namespaces, build_indexes(home, namespaces, span(namespaces)), strict=True))


def span(namespaces: list[str]) -> str:
    """How a task run names the namespaces it covers, in the Prefect UI."""
    return namespaces[0] if len(namespaces) == 1 else f"{namespaces[0]} .. {namespaces[-1]}"


def index_namespaces(
    config: RuntimeConfig,
    namespaces: list[str],
    *,
    use_ray: bool,
    show_progress: bool,
    encoders: EncoderPool | None = None,
) -> list[StageResult]:
    """Level-0 memories, embeddings and indexes for each namespace, pipelined around the encoders.

    The encoders are the real cost, so they must never wait on the flow: each namespace's pending
    texts go to them as soon as its level-0 memories exist, and while they encode the flow process
    materialises the next namespace, commits finished chunks and builds the indexes of the
    namespaces whose last chunk came back. `encoders`: already started by the caller (the ingest
    flow starts them before parsing, so their start-up overlaps with it), else started here.
    """
    store = MemoryStore(config.home)
    created: dict[str, StageResult] = {}
    built: dict[str, StageResult] = {}
    embedded = dict.fromkeys(namespaces, 0)
    nothing_to_embed: list[str] = []
    pool = encoders or start_encoders(config, use_ray=use_ray)

    with pool, Progress("embedding", 0, enabled=show_progress) as bar:
        ready: dict[str, list[pa.Table]] = {}  # finished chunks not yet committed

        def commit(results: list[tuple[str, pa.Table]]) -> None:
            """Commit finished chunks, and build the indexes of complete namespaces, in batches."""
            for ns, table in results:
                ready.setdefault(ns, []).append(table)
            bar.advance(sum(table.num_rows for _, table in results))
            # A namespace is complete once none of its chunks is outstanding (all were submitted at once).
            pending = pool.pending_namespaces()
            complete = [ns for ns in ready if ns not in pending]
            rows = sum(t.num_rows for tables in ready.values() for t in tables)
            if not ready or (pool.outstanding and len(complete) < BUILD_GROUP and rows < COMMIT_ROWS):
                return
            with store.hold():  # one connection for the step's reads and writes (see MemoryStore.hold)
                for ns, tables in ready.items():
                    embedded[ns] += index.commit_embeddings(store, ns, pa.concat_tables(tables))
                built.update(build_all(config.home, complete))
            ready.clear()

        for group in level0_groups(namespaces):
            with store.hold():  # opening the store costs tens of ms: one hold for the whole step
                created.update(zip(group, make_level0(config, group, span(group)), strict=True))
                for ns in group:
                    ids, texts = index.pending_embeddings(store, ns)
                    if not ids:  # nothing to embed; a stage may still have changed what is indexed
                        nothing_to_embed.append(ns)
                    bar.add_total(len(ids))
                    pool.submit(ns, ids, texts)
                commit(pool.collect(timeout=0))
        built.update(build_all(config.home, nothing_to_embed))
        while pool.outstanding:
            commit(pool.collect(timeout=WAIT_S))
        pool.stop()

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
    encoders = start_encoders(config, use_ray=use_ray)  # they start up while the input is parsed
    with timed(total), encoders:
        events, quarantine = parse_input(Path(path), fmt, namespace)
        committed = commit_events(config.home, events, quarantine)
        namespaces = committed.figures["namespaces"]
        indexed = index_namespaces(
            config, namespaces, use_ray=use_ray, show_progress=show_progress, encoders=encoders
        )
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
