"""Index builds of many namespaces at once: started, then finished apart, so a flow goes on while they run.

`start_builds` reads the namespaces' rows and current manifests in one query each (in the caller's
process, the store's one writer) and hands each namespace's plan and files (`index_build.plan_and_write`)
to the process pool (tasks/workers.py); `finish_builds` waits for them and commits every manifest
in one transaction, then removes the older versions' files. Between the two the caller is free: the
ingest flow's embedding loop keeps collecting and storing the encoders' results while the files are
written. A run that crashes between them leaves version folders no manifest points at (the next
build of the namespace writes the same version number over them) and nothing half committed.
`build_many` is the two back to back.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass

import pyarrow as pa

from memstage.gpu.encoder import model_info
from memstage.stores import artifacts, index_reads
from memstage.stores.schema import INDEX_MANIFEST
from memstage.stores.store import MemoryStore, now_utc
from memstage.tasks import workers
from memstage.tasks.contract import StageResult
from memstage.tasks.index_build import KINDS, Written, plan_and_write


@dataclass
class PendingBuilds:
    """Builds started by `start_builds`: one future of `plan_and_write`'s result per namespace."""

    results: list[StageResult]
    futures: list[Future]
    read_s: float  # seconds the caller spent reading the rows and manifests

    @property
    def namespaces(self) -> list[str]:
        return [r.namespace for r in self.results]

    def done(self) -> bool:
        return all(f.done() for f in self.futures)


def start_builds(
    store: MemoryStore, namespaces: list[str], *, parallel: bool, background: bool = False
) -> PendingBuilds:
    """Read the namespaces' rows and manifests here, one query each, and start each namespace's plan
    and files: on the process pool when `parallel` and more than one namespace (or `background`, which
    sends even one there, off the caller's thread), else here, before this returns."""
    start = time.perf_counter()
    rows = index_reads.namespaces_rows(store, namespaces)
    current = index_reads.current_manifests(store, namespaces)
    read_s = time.perf_counter() - start
    use_pool = parallel and (background or len(namespaces) > 1) and workers.pool_size() > 1
    pool = workers.get_pool() if use_pool else None
    # each namespace's rows as a table of its own, not a slice of the batch's read: what the pool is
    # sent is its rows only (workers.owned), and its files are the same bytes whatever the batch held
    # (one namespace's read is its own already: no copy of a 1M-row namespace)
    own = workers.owned if len(namespaces) > 1 else (lambda t: t)
    futures: list[Future] = []
    for ns in namespaces:
        args = (ns, store.index_dir(ns), own(rows.pop(ns)), own(current[ns]))
        futures.append(
            pool.submit(plan_and_write, *args) if pool else workers.finished(plan_and_write(*args))
        )
    return PendingBuilds([StageResult("index.build", ns) for ns in namespaces], futures, read_s)


def finish_builds(store: MemoryStore, pending: PendingBuilds) -> list[StageResult]:
    """Wait for the builds (a pool process's error is raised here), commit every new manifest in one
    transaction, then remove the files of the versions they replace."""
    manifests = {}
    share = pending.read_s / max(1, len(pending.results))
    for result, future in zip(pending.results, pending.futures, strict=True):
        written, figures, seconds = future.result()
        result.duration_s = share + seconds
        if written is None:
            result.figures = figures
        else:
            manifests[result.namespace] = manifest_rows(store, written, result)
    # one transaction for every namespace's manifest; then the older versions' files go (the
    # manifest now points at the new ones only)
    artifacts.commit_manifests(store, manifests)
    for ns, table in manifests.items():
        artifacts.remove_stale(
            store.index_dir(ns), {store.home / p for p in table.column("path").to_pylist()}
        )
    return pending.results


def build_many(
    store: MemoryStore, namespaces: list[str], *, flow_run_id: str | None = None, parallel: bool = False
) -> list[StageResult]:
    """`build_indexes` of several namespaces: their rows and manifests read here in one query each,
    each namespace's plan (found-by texts, fingerprint) and artifact files made on the process pool
    (tasks.workers) when `parallel` and more than one, the manifests committed here in one transaction."""
    return finish_builds(store, start_builds(store, namespaces, parallel=parallel))


def build_indexes(store: MemoryStore, namespace: str, *, flow_run_id: str | None = None) -> StageResult:
    """Write the namespace's artifacts as a new version when its memories changed since the current one."""
    return build_many(store, [namespace], flow_run_id=flow_run_id)[0]


def manifest_rows(store: MemoryStore, job: Written, result: StageResult) -> pa.Table:
    """The manifest rows of the written version (committed by the caller); sets `result`."""
    rel = artifacts.version_dir(job.index_dir, job.version).relative_to(store.home)
    model = model_info().name
    files = {"columns": "rows.arrow", "dense": "dense.faiss", "lexical": "lexical"}
    new_rows = [
        {
            "namespace": job.namespace,
            "level": lvl,
            "kind": kind,
            "version": job.version,
            "path": str(rel / f"L{lvl}.{files[kind]}"),
            "count": job.infos[lvl]["count"],
            "model": model,
            "fingerprint": job.fingerprint,
            "created_at": now_utc(),
            "current": True,
        }
        for lvl in sorted(job.infos)
        for kind in KINDS
    ]
    result.changed = len(job.infos)
    result.figures = {
        "levels_rebuilt": sorted(job.infos),
        "memories_indexed": job.memories,
        "version": job.version,
    }
    return pa.Table.from_pylist(new_rows, schema=INDEX_MANIFEST)
