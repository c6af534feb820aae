"""A stage over many namespaces: workers compute on Arrow snapshots, the flow's process commits in batches.

For each namespace the flow's process reads a snapshot (`stores/snapshot.py`) and submits one task
(a Ray task under the Ray runner) that runs the registered stage in a scratch store of the worker's
own and returns its result and changes: a worker never opens the data directory. At most `window`
tasks are in flight (twice the cluster's CPUs, so workers never wait for the flow's reads and
commits); their changes are committed in submission order, `batch` namespaces per transaction.
A namespace whose task fails is retried once by Prefect (that task alone) and then reported; the
others' changes are committed all the same.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from memstage.runtime.backends import RuntimeConfig, flow_run_id, stage_task
from memstage.runtime.services import services
from memstage.stores import snapshot
from memstage.stores.store import MemoryStore
from memstage.tasks.contract import StageResult
from memstage.tasks.registry import StageTools, get_stage


@stage_task(name="stage", task_run_name="{stage} {namespace}", retries=1, retry_delay_seconds=[2])
def stage_namespace(
    config: RuntimeConfig,
    stage: str,
    namespace: str,
    snap: snapshot.Snapshot,
    use_ray: bool,
    run_id: str | None,
) -> tuple[StageResult, snapshot.Changes]:
    """One registered stage over one namespace's snapshot, in a scratch store: needs no data directory."""
    svc = services(config, use_ray=use_ray)
    tools = StageTools(embed=svc.encode, count_tokens=svc.count_tokens, flow_run_id=run_id)
    with snapshot.scratch(snap) as scratch:
        result = get_stage(stage).run(scratch, namespace, tools)
        return result, snapshot.diff(scratch, snap)


@dataclass
class FanOut:
    """What a fan-out did: results in namespace order, failures by namespace, and its rates."""

    results: list[StageResult] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    turns: int = 0
    duration_s: float = 0.0
    batches: int = 0

    def throughput(self, namespaces: int) -> dict[str, Any]:
        s = self.duration_s or 1e-9
        return {
            "namespaces": namespaces,
            "turns": self.turns,
            "namespaces_per_s": round(namespaces / s, 2),
            "turns_per_s": round(self.turns / s, 1),
            "batches": self.batches,
        }


def cluster_slots(use_ray: bool) -> int:
    """How many stage tasks the cluster runs at once: its CPUs under Ray, else this machine's."""
    import os

    if use_ray:
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, os.cpu_count() or 1)


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
    batch = batch or slots
    window = 2 * slots
    out, start = FanOut(), time.perf_counter()
    run_id = flow_run_id()
    in_flight: deque[tuple[str, Any]] = deque()
    ready: list[tuple[StageResult, snapshot.Changes]] = []

    def take_oldest() -> None:
        ns, fut = in_flight.popleft()
        try:
            ready.append(fut.result())
        except Exception as exc:  # noqa: BLE001 - one namespace failing does not hide the others
            out.failed[ns] = f"{type(exc).__name__}: {exc}"
            if log:
                log.error("%s %s failed: %s", stage, ns, out.failed[ns])
        if len(ready) >= batch or (not in_flight and ready):
            commit()

    def commit() -> None:
        snapshot.apply(store, [c for _, c in ready])
        out.results.extend(r for r, _ in ready)
        out.batches += 1
        if log:
            for r, c in ready:
                log.info("%s %s: %s (%d rows committed)", stage, r.namespace, r.as_dict(), c.rows)
        ready.clear()

    for ns in namespaces:
        snap = snapshot.read(store, ns)
        out.turns += snap.tables["events"].num_rows
        in_flight.append((ns, stage_namespace.submit(config, stage, ns, snap, use_ray, run_id)))
        if len(in_flight) >= window:
            take_oldest()
    while in_flight:
        take_oldest()
    out.duration_s = time.perf_counter() - start
    return out
