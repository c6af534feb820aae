"""Long-lived state of a worker: the loaded encoder, tokenizer, retriever and generator of one data directory.

`MemoryServices` loads each model once, lazily. In Ray mode it lives in a named actor (one per data
directory, found again by name, detached on a real cluster so a later query finds it warm); in
local mode one instance is kept per process. Tasks reach it through `services(config)`, so a second
query in the same worker never reloads a model or an index.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from memstage.gpu.coalesce import Coalescer
from memstage.runtime.backends import RuntimeConfig, ensure_ray
from memstage.settings import get_settings
from memstage.stores.store import MemoryStore, models_dir


class MemoryServices:
    """Lazily loaded models and indexes for one data directory."""

    def __init__(self, home: str, threads: int | None = None) -> None:
        self.home = home
        self._store: MemoryStore | None = None
        self._threads = threads
        self._lock = threading.Lock()
        self._gen_lock = threading.Lock()  # a generator load does not hold up the encoder or counter
        self._encode_lock = threading.Lock()
        self._encoder = None
        self._counter = None
        self._retriever = None
        # concurrent retrievals (serve's threads) run in batches: gpu/coalesce.py
        self._retrievals = Coalescer(self._retrieve_batch, max_size=64)
        self._generators: dict[str, Any] = {}

    @property
    def store(self) -> MemoryStore:
        """Opened on first use: the stage tasks' encoder and token counter need no data directory
        (an actor on a worker node without it serves them), queries do."""
        if self._store is None:
            self._store = MemoryStore(self.home)
        return self._store

    def ping(self) -> str:
        return str(self.home)

    @property
    def encoder(self) -> Any:
        with self._lock:
            if self._encoder is None:
                import torch

                from memstage.gpu.encoder import Encoder, pick_device

                # Ray sets OMP threads to the actor's CPU share; the encoder is the real cost: give it
                # the cores. Done here, not in __init__, so a process that only counts tokens (the
                # flow's driver) never imports torch.
                n = self._threads or get_settings().threads or os.cpu_count() or 1
                torch.set_num_threads(n)
                # On CPU, with transformers alone (no sentence-transformers import: seconds of a cold query)
                self._encoder = Encoder(light=pick_device() == "cpu")
            return self._encoder

    @property
    def counter(self) -> Any:
        with self._lock:
            if self._counter is None:
                from memstage.gpu.tokenizer import TokenCounter

                self._counter = TokenCounter(models_dir(self.home))
            return self._counter

    @property
    def retriever(self) -> Any:
        if self._retriever is None:
            from memstage.gpu.coalesce import CoalescingEncoder
            from memstage.tasks.retrieve import Retriever

            # questions of concurrent requests (serve's threads) share forward passes (gpu/coalesce.py)
            self._retriever = Retriever(self.store, CoalescingEncoder(self.encoder), self.counter)
        return self._retriever

    def generator(self, engine: str | None = None) -> Any:
        """The generator of `engine` (default: MEMSTAGE_GENERATOR), loaded once and kept."""
        engine = engine or get_settings().generator
        with self._gen_lock:
            if engine not in self._generators:
                from memstage.gpu.generator import make_generator

                self._generators[engine] = make_generator(engine, self.store.models_dir())
            return self._generators[engine]

    def warm(self, *, generator: str | None = None) -> None:
        """Load what a query needs (overlaps with Prefect's start-up when called from a thread)."""
        _ = self.retriever
        if generator:
            self.generator(generator)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        # One encode at a time: concurrent forward passes, each using every core, thrash the CPU
        # (measured: 0.57 of the bare encoder's rate). The actor is single-threaded anyway; a local
        # instance may be shared by threads.
        encoder = self.encoder
        with self._encode_lock:
            return encoder.encode(texts)

    def encoder_timings(self) -> dict[str, float]:
        """The encoder's cumulative timings (`Encoder.timings`); empty before it is loaded."""
        return dict(self._encoder.timings) if self._encoder is not None else {}

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.counter.count_many(texts)

    def retrieve(self, namespace: str, question: str, budget: int, **options: Any) -> dict[str, Any]:
        """One retrieval. Concurrent callers (serve's threads) are batched (gpu/coalesce.py): one forward
        pass embeds the batch's questions, then one thread runs the retrievals one after another."""
        return self._retrievals.submit((namespace, question, budget, options))

    def _retrieve_batch(self, batch: list[tuple[str, str, int, dict[str, Any]]]) -> Any:
        import time

        retriever = self.retriever
        start = time.perf_counter()
        vectors = retriever.encoder.encode([retriever.searched(ns, q) for ns, q, _, _ in batch])
        encode_ms = (time.perf_counter() - start) * 1000  # every question of the batch waited for it
        for (namespace, question, budget, options), qvec in zip(batch, vectors, strict=True):
            try:
                result = retriever.retrieve(namespace, question, budget, qvec=qvec, **options)
                result["latency_ms"] = round(result["latency_ms"] + encode_ms, 2)
                yield result
            except Exception as exc:  # noqa: BLE001 - raised in that request's own caller
                yield exc

    def answer(self, retrieval: dict[str, Any], engine: str | None = None, **options: Any) -> dict[str, Any]:
        from memstage.tasks.forget import load_policy
        from memstage.tasks.generate import STANDING_BUDGET, answer_question, standing_block

        if "flagged" not in options:  # instruction-like memories: quoted with a warning, or held out
            options["flagged"] = load_policy(self.store, retrieval["namespace"])["flagged"]
        if "standing" not in options:  # the namespace's stable block goes first, so its KV cache is reused
            from memstage.stores.queries import summary_memories

            memories = summary_memories(self.store, retrieval["namespace"])
            options["standing"] = standing_block(
                memories, STANDING_BUDGET, self.counter.count, flagged=options["flagged"]
            )
        return answer_question(self.generator(engine), retrieval, **options)


class _ActorProxy:
    """Calls a MemoryServices actor as if it were local (blocking)."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    def __getattr__(self, name: str) -> Any:
        import ray

        method = getattr(self._actor, name)
        return lambda *a, **kw: ray.get(method.remote(*a, **kw))


_local: dict[str, MemoryServices] = {}
_actors: dict[str, _ActorProxy] = {}
_local_lock = threading.Lock()


_worker_encoder: Any = None


def worker_encoder() -> Any:
    """This process's own encoder, for embedding tasks on CPU workers: loaded by the worker's first
    embedding task and kept for its next ones (a Ray worker lives on between tasks).

    Why not the services actor: one encoder process using every core (intra-op threads) ran the
    LoCoMo dev split at 86 turns/s here, two single-threaded processes on half the texts each at
    95-120 turns/s together (no thread barriers, and a preempted process stalls only itself). So on
    CPU each embedding task encodes itself, with as many threads as the CPUs Ray gave it, and the
    flow runs one task per CPU of the cluster.
    """
    global _worker_encoder  # one per worker process, like any per-worker model cache in Ray
    if _worker_encoder is None:
        import torch

        from memstage.gpu.encoder import Encoder

        torch.set_num_threads(max(1, int(_assigned_cpus())))
        _worker_encoder = Encoder(device="cpu")
    return _worker_encoder


def worker_encoder_timings() -> dict[str, float]:
    """`Encoder.timings` of this process's worker encoder; empty before it is loaded."""
    return dict(_worker_encoder.timings) if _worker_encoder is not None else {}


_worker_counters: dict[str, Any] = {}


def worker_counter(key: str, tokenizer: Any) -> Any:
    """This process's token counter, built from the flow's `tokenizer.json` (bytes, or a Ray object
    ref of them) on a worker's first stage task and kept under `key` for its next ones: a worker
    needs no models folder, and no call to the services actor per count (one actor serialised every
    worker's counts)."""
    counter = _worker_counters.get(key)
    if counter is None:
        from memstage.gpu.tokenizer import TokenCounter

        if not isinstance(tokenizer, bytes):
            import ray

            tokenizer = ray.get(tokenizer)
        counter = _worker_counters[key] = TokenCounter.from_json(tokenizer.decode())
    return counter


def _assigned_cpus() -> float:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:  # noqa: BLE001 - not inside a Ray task
        pass
    return float(os.cpu_count() or 1)


def embedding_slots(use_ray: bool) -> tuple[str, int]:
    """Where a batch flow encodes, and how many encoders it runs at once.

    ("workers", CPUs of the cluster, at most MEMSTAGE_ENCODERS, default 16) on CPU-only Ray: each
    encoder task encodes in its own worker (see `worker_encoder`), and each such worker keeps a copy
    of the model (about 300 MB with torch). ("actor", 1) when the cluster has a GPU: the services
    actor's encoder holds the card and takes big batches. ("local", 1) without Ray.
    """
    if not use_ray:
        return "local", 1
    import ray

    resources = ray.cluster_resources()
    if resources.get("GPU", 0) >= 1:
        return "actor", 1
    cap = get_settings().encoders
    return "workers", max(1, min(cap, int(resources.get("CPU", 1))))


def actor_name(home: str) -> str:
    return "memstage-services-" + hashlib.sha1(home.encode()).hexdigest()[:12]


def services(config: RuntimeConfig, *, use_ray: bool) -> Any:
    """The services of `config.home`: a Ray actor (created on first use) or this process's instance."""
    home = str(config.home)
    with _local_lock:
        if not use_ray:
            if home not in _local:
                _local[home] = MemoryServices(home)
            return _local[home]
        if home not in _actors:
            _actors[home] = _ActorProxy(_get_or_create_actor(config))
        return _actors[home]


def _get_or_create_actor(config: RuntimeConfig) -> Any:
    import ray

    ensure_ray(config)
    # No CPU reserved: an actor lives as long as Ray, one per data directory, and each one holding a
    # CPU starved the embedding tasks of a second data directory on a 2-CPU machine (they waited
    # forever). Its compute runs on behalf of the batch tasks that call it, which hold their CPU.
    # A tenth of a GPU: both models fit many times over, and several data directories share a card.
    gpus = 0.1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    # Detached: the actor must outlive the handle of whichever task created it (a non-detached actor
    # dies with its last reference, and every task would reload the models). A local Ray takes it
    # down at shutdown; on a cluster it stays warm for the next flow run.
    # max_concurrency=1: calls run one at a time on the actor's main thread. The same encoder in a
    # threaded actor (max_concurrency=4, as before) ran 69-76 turns/s against 81-94 on the main
    # thread, alternated in one probe run; every model call is CPU-bound, so threads bought nothing.
    return (
        ray.remote(MemoryServices)
        .options(
            name=actor_name(str(config.home)),
            namespace="memstage",
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            num_gpus=gpus,
            max_concurrency=1,
        )
        .remote(str(config.home))
    )
