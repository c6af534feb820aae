"""A stage over many namespaces: workers compute on Arrow snapshots of batches, the flow's process commits.

The namespaces are cut into batches (`batch_size`: about four per cluster CPU, at most
`MAX_BATCH` namespaces each). For each batch the flow's process reads one snapshot
(`stores/snapshot.py`, one query per table) and submits one task (a Ray task under the Ray runner,
one Prefect task run) that runs the registered stage over every namespace of the batch in one
scratch store of the worker's own and returns the results and the changes: a worker never opens the
data directory. Its models stay loaded between tasks: the encoder and the token counter are the
worker process's own (`runtime/services.py`; the services actor's encoder when the cluster has a
GPU). At most `window` batches are in flight (twice the cluster's CPUs, so workers never wait for
the flow's reads and commits); each batch's changes are committed in one transaction, one insert
per table. A namespace whose stage raises is left out of its batch's changes and retried alone
once, in a task of its own; if it fails again it is reported, and the others' changes stand.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from memstage.runtime.backends import RuntimeConfig, flow_run_id, stage_task
from memstage.runtime.services import services, worker_counter, worker_encoder
from memstage.stores import snapshot
from memstage.stores.store import MemoryStore, models_dir
from memstage.tasks import index
from memstage.tasks.contract import StageResult
from memstage.tasks.registry import StageTools, get_stage

MAX_BATCH = 64  # namespaces per task: enough to hide a task's fixed cost (Prefect run, scratch store)
BATCHES_PER_SLOT = 4  # at least this many batches per CPU when there are namespaces enough: balance
HOLD_S = 2.0  # the flow keeps the store open across reads and commits this long, then lets others in

# Stages whose first step embeds the memories waiting for an embedding (`tasks.index.embed_missing`:
# those compress shortened; consolidate and update both start so): done for the whole batch in one encoder call before them, so they
# find nothing to embed. `index` reports what it embedded, so it keeps its own calls.
EMBED_FIRST = frozenset({"consolidate", "update"})

BatchOut = tuple[list[StageResult], snapshot.Changes, dict[str, str]]


@dataclass(frozen=True)
class Models:
    """How a worker reaches its models: the tokenizer's text (or a Ray object ref of it) under a key,
    and whether embeddings go to the services actor (a GPU cluster) or the worker's own encoder."""

    key: str
    tokenizer: Any
    use_actor: bool


def _tools(config: RuntimeConfig, use_ray: bool, models: Models | None, run_id: str | None) -> StageTools:
    if models is None:  # in-process: this process's services
        svc = services(config, use_ray=False)
        return StageTools(embed=svc.encode, count_tokens=svc.count_tokens, flow_run_id=run_id)
    embed = services(config, use_ray=True).encode if models.use_actor else worker_encoder().encode
    counter = worker_counter(models.key, models.tokenizer)
    return StageTools(embed=embed, count_tokens=counter.count_many, flow_run_id=run_id)


@stage_task(name="stage", task_run_name="{stage} {label}", retries=1, retry_delay_seconds=[2])
def stage_batch(
    config: RuntimeConfig,
    stage: str,
    snap: snapshot.Snapshot,
    use_ray: bool,
    models: Models | None,
    run_id: str | None,
    label: str,
) -> BatchOut:
    """One registered stage over a batch's snapshot, in one scratch store: needs no data directory.
    A namespace whose stage raises is reported in the third part, its changes left out."""
    tools = _tools(config, use_ray, models, run_id)
    run = get_stage(stage).run
    results: list[StageResult] = []
    failed: dict[str, str] = {}
    with snapshot.scratch(snap) as scratch:
        if stage in EMBED_FIRST:
            embed_pending(scratch, snap.namespaces, tools.embed)
        for ns in snap.namespaces:
            try:
                results.append(run(scratch, ns, tools))
            except Exception as exc:  # noqa: BLE001 - one namespace failing does not hide the others
                failed[ns] = f"{type(exc).__name__}: {exc}"
        return results, snapshot.diff(scratch, snap, [r.namespace for r in results]), failed


def embed_pending(store: MemoryStore, namespaces: list[str], embed: Any) -> int:
    """Embed the memories of `namespaces` that wait for an embedding, in one encoder call; on any
    error nothing (each namespace's stage embeds its own then). Returns how many were embedded."""
    try:
        todo = [(ns, *index.pending_embeddings(store, ns)) for ns in namespaces]
        texts = [t for _, _, ts in todo for t in ts]
        if not texts:
            return 0
        vectors, at = embed(texts), 0
        for ns, ids, _ in todo:
            index.commit_embeddings(store, ns, index.embeddings_table(ids, vectors[at : at + len(ids)]))
            at += len(ids)
        return len(texts)
    except Exception:  # noqa: BLE001 - an optimisation only: the stages embed what is left
        return 0


class _Lease:
    """The store kept open (`MemoryStore.hold`) for a run of snapshot reads and commits, let go every
    HOLD_S seconds so other processes (a query, a journal merge) get their turn: opening DuckDB and
    checkpointing at close was half of each batch's time in the flow's process (10k namespaces:
    350 ms of a batch's read and commit, 150 ms held)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store, self.stack, self.since = store, contextlib.ExitStack(), 0.0

    def ensure(self) -> None:
        now = time.monotonic()
        if self.since and now - self.since > HOLD_S:
            self.release()
        if not self.since:
            self.stack.enter_context(self.store.hold())
            self.since = now

    def release(self) -> None:
        self.stack.close()
        self.since = 0.0


@dataclass
class FanOut:
    """What a fan-out did: results in namespace order, failures by namespace, and its rates."""

    results: list[StageResult] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    turns: int = 0
    duration_s: float = 0.0
    batches: int = 0
    retried: list[str] = field(default_factory=list)

    def throughput(self, namespaces: int) -> dict[str, Any]:
        s = self.duration_s or 1e-9
        return {
            "namespaces": namespaces,
            "turns": self.turns,
            "namespaces_per_s": round(namespaces / s, 2),
            "turns_per_s": round(self.turns / s, 1),
            "batches": self.batches,
            "retried": len(self.retried),
        }


def cluster_slots(use_ray: bool) -> int:
    """How many stage tasks the cluster runs at once: its CPUs under Ray, else this machine's."""
    import os

    if use_ray:
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, os.cpu_count() or 1)


def batch_size(namespaces: int, slots: int) -> int:
    """Namespaces per task: BATCHES_PER_SLOT batches per slot at least, at most MAX_BATCH each."""
    return max(1, min(MAX_BATCH, math.ceil(namespaces / (BATCHES_PER_SLOT * slots))))


def worker_models(config: RuntimeConfig, use_ray: bool) -> Models | None:
    """What the workers load their models from (None in-process); the tokenizer travels once, by ref."""
    if not use_ray:
        return None
    import ray

    from memstage.gpu.tokenizer import tokenizer_file

    blob = tokenizer_file(models_dir(config.home)).read_bytes()
    use_actor = ray.cluster_resources().get("GPU", 0) >= 1
    return Models(hashlib.sha1(blob).hexdigest()[:16], ray.put(blob), use_actor)


def span(namespaces: list[str]) -> str:
    return (
        namespaces[0] if len(namespaces) == 1 else f"{namespaces[0]} .. {namespaces[-1]} ({len(namespaces)})"
    )


def fan_out(
    stage: str,
    namespaces: list[str],
    config: RuntimeConfig,
    use_ray: bool,
    store: MemoryStore,
    *,
    batch: int | None = None,
    log: Any = None,
) -> FanOut:
    slots = cluster_slots(use_ray)
    size = batch or batch_size(len(namespaces), slots)
    window = 2 * slots
    out, start = FanOut(), time.perf_counter()
    run_id, models = flow_run_id(), worker_models(config, use_ray)
    in_flight: deque[tuple[list[str], Any]] = deque()
    first_failures: dict[str, str] = {}

    def submit(names: list[str]) -> None:
        lease.ensure()
        snap = snapshot.read(store, names)
        out.turns += snap.tables["events"].num_rows if names not in retry_batches else 0
        fut = stage_batch.submit(config, stage, snap, use_ray, models, run_id, span(names))
        in_flight.append((names, fut))

    def take_oldest() -> None:
        names, fut = in_flight.popleft()
        fut.wait(HOLD_S / 4)
        if not fut.state.is_final():  # a longer wait: not with the store held
            lease.release()
        try:
            results, changes, failed = fut.result()
        except Exception as exc:  # noqa: BLE001 - the batch's task failed twice: all its namespaces
            results, changes, failed = [], None, dict.fromkeys(names, f"{type(exc).__name__}: {exc}")
        if changes is not None and changes.namespaces:
            lease.ensure()
            rows = snapshot.apply(store, [changes])
            if log:
                log.info("%s %s: %d ok, %d failed, %d rows committed", stage, span(names), len(results),
                         len(failed), rows)  # fmt: skip
        out.results.extend(results)
        out.batches += 1
        for ns, err in failed.items():
            if ns in first_failures:  # this was its retry
                out.failed[ns] = err
                if log:
                    log.error("%s %s failed again: %s", stage, ns, err)
            else:
                first_failures[ns] = err
                if log:
                    log.warning("%s %s failed, retried alone: %s", stage, ns, err)

    retry_batches: list[list[str]] = []
    batches = [namespaces[i : i + size] for i in range(0, len(namespaces), size)]
    lease = _Lease(store)
    try:
        for names in batches:
            submit(names)
            if len(in_flight) >= window:
                take_oldest()
        while in_flight or len(first_failures) > len(out.retried):
            for ns in list(first_failures)[len(out.retried) :]:  # each failed namespace once more, alone
                out.retried.append(ns)
                retry_batches.append([ns])
                submit([ns])
            take_oldest()
    finally:
        lease.release()
    order = {ns: i for i, ns in enumerate(namespaces)}
    out.results.sort(key=lambda r: order.get(r.namespace, len(order)))
    out.duration_s = time.perf_counter() - start
    return out
