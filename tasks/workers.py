"""The flow process's pool of worker processes, for per-text and per-namespace CPU work of a big ingest.

Injection flags and token counts of level-0 texts (tasks.level0) and the artifact files of
namespaces' indexes (tasks.index_build) are pure functions of their inputs, so they can run here
instead of in the flow's one Python thread; results are the same as computed inline. The pool is
made on first use (spawned processes: the flow holds threads, Prefect's and DuckDB's, that a fork
would copy mid-lock) and kept for the process's later flows.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

_pool: ProcessPoolExecutor | None = None


def pool_size() -> int:
    """MEMSTAGE_SCAN_WORKERS, else all but two of the CPUs this process may use, at most 16 (1: no
    pool, the work runs in the flow's process). The injection scan is the driver's biggest per-turn
    cost (about 0.4 ms of regexes a turn here), and on a GPU host the encoder needs few cores."""
    from memstage.settings import get_settings

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return get_settings().scan_workers or max(1, min(16, cpus - 2))


def get_pool() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:
        import multiprocessing

        _pool = ProcessPoolExecutor(pool_size(), mp_context=multiprocessing.get_context("spawn"))
    return _pool


def pool_started() -> bool:
    return _pool is not None
