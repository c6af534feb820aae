"""The flow process's pool of worker processes, for per-text and per-namespace CPU work of a big ingest.

Injection flags and token counts of level-0 texts (tasks.level0) and the artifact files of
namespaces' indexes (tasks.index_build) are pure functions of their inputs, so they can run here
instead of in the flow's one Python thread; results are the same as computed inline. The pool is
made on first use (spawned processes: the flow holds threads, Prefect's and DuckDB's, that a fork
would copy mid-lock) and kept for the process's later flows. Each pool process is one worker: its
numerical libraries (OpenMP, BLAS, the tokenizer) run one thread, so N processes keep N cores busy
instead of each spinning a team of threads the size of the machine (on the 16-core H200 host the
pool spent 50-82 CPU-s a round of 55,200 turns, about 5x the per-turn CPU measured on 2 cores).
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import pyarrow as pa

_pool: ProcessPoolExecutor | None = None
ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")


NICENESS = 5  # below the flow's process and the encoders, which the pool's work must not hold up


def _one_thread() -> None:
    """Pool initializer: before any numerical library loads in this process, one thread each; and a
    lower priority, so that under contention the cores go to the encoders' tokenising threads and the
    flow's commits first (the pool's level-0 rows and index files wait for them anyway). Alone on
    the cores, as when it parses the input, the pool runs as fast as before."""
    for name in ONE_THREAD:
        os.environ[name] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with contextlib.suppress(OSError):  # not permitted here: run at the flow's priority
        os.nice(NICENESS)


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

        _pool = ProcessPoolExecutor(
            pool_size(), mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread
        )
    return _pool


def pool_started() -> bool:
    return _pool is not None


def owned(table: pa.Table) -> pa.Table:
    """`table` with buffers of its own rows only, to send to the pool. A slice pickles its parent's
    whole buffers (pyarrow 26): a 552-row slice of a 55,000-row table of embeddings pickled to 90 MB,
    and shipping each namespace's slice of a build batch's rows sent ~8.5 GB through the pool's
    pipes per round of 55,200 turns on the H200 (20 of the round's 25 s)."""
    return table.take(pa.array(range(table.num_rows), pa.int64()))


def finished(value: Any) -> Future:
    """A future already holding `value`: work done in this process, handed on as the pool's would be."""
    done: Future = Future()
    done.set_result(value)
    return done
