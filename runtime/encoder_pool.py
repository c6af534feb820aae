"""Encoder pool of a batch flow: one long-running encoder task per slot, pulling small chunks of texts.

Why not one Prefect task per batch: a task run on Ray costs about 0.3 core-seconds of orchestration
(the task engine starting in the worker, state events, the API server), so batches had to be few and
large, and a few large batches finish unevenly: on 2 cores one encoder sat idle for up to 3.7 s at
the end of a 30 s ingest, and the second one started 0.6 s after the first. Here a flow has one
task run per encoder whatever its input size, submitted before the flow parses its input; the
encoders share the work a chunk at a time (length-sorted, so a chunk pads little) and the flow
commits each finished chunk while the rest encode.

The chunks and results travel through the flow process's `ChunkBroker` (flows/chunk_broker.py),
which encoders on this machine reach through a socket, and encoders on a cluster through an actor.
"""

from __future__ import annotations

import functools
import itertools
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from memstage.runtime.backends import RuntimeConfig, stage_task
from memstage.runtime.chunk_broker import BrokerChannel, open_channel
from memstage.runtime.phases import encoder_report
from memstage.runtime.services import embedding_slots, services, worker_encoder, worker_encoder_timings
from memstage.settings import get_settings
from memstage.tasks import index, workers

# Texts per chunk. CPU: about a second of one core, so the encoders finish within a second of each
# other; length-sorted 64-text chunks encode as fast as 690-text batches (padding is what costs).
# GPU: the card wants big calls: the encoder tokenises a call's batches on all cores ahead of the
# model (gpu/encoder.py), and each chunk costs a round trip through the broker and the actor.
# Local: one encoder with every core, pipelined with the flow. MEMSTAGE_ENCODER_CHUNK overrides.
CHUNK = {"workers": 64, "actor": 4096, "local": 256}
WAIT_S = 2.0  # longest wait for results in one call: the flow's loop stays responsive
GATHER = 4  # results one call waits for (within WAIT_S): a round trip when the broker is an actor
ALIVE_CHECK_S = 5.0  # without results for this long, ask Prefect whether the encoders still run


@stage_task(name="encoder", task_run_name="encoder {slot} of {slots}")
def run_encoder(
    config: RuntimeConfig, broker: BrokerChannel, slot: int, slots: int, where: str
) -> dict[str, Any]:
    """Encode chunks until the flow says stop; returns this encoder's report (runtime/phases.py):
    how many texts it embedded, its seconds inside encode, and the `Encoder`'s own timings."""
    if where == "workers":
        encode, timings = worker_encoder().encode, worker_encoder_timings
    else:
        where_services = services(config, use_ray=where == "actor")
        encode, timings = where_services.encode, where_services.encoder_timings
    before = timings()
    done, busy = 0, 0.0
    item = broker.call("get_work")
    while item is not None:
        if item == "wait":
            item = broker.call("get_work")
            continue
        chunk_id, ids, texts = item
        start = time.perf_counter()
        vectors = encode(texts)
        busy += time.perf_counter() - start
        item = broker.call("exchange", (chunk_id, index.embeddings_table(ids, vectors)))
        done += len(ids)
    return encoder_report(slot, done, busy, before, timings())


@dataclass
class EncoderPool:
    """A flow's running encoders: submit chunks, collect embeddings, stop. Use as a context manager."""

    broker: BrokerChannel
    futures: list[Any]
    chunk: int
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    outstanding: dict[int, list[tuple[str, int]]] = field(
        default_factory=dict
    )  # chunk id -> its (namespace, rows)
    _last_result: float = field(default_factory=time.monotonic)
    reports: list[dict[str, Any]] = field(default_factory=list)  # the encoders', after `stop`
    # chunks go to the encoders as token ids made on the flow's worker pool (`_tokenise_then_put`)
    pretokenise: bool = False
    _failed: list[BaseException] = field(default_factory=list)  # a chunk's tokenising or its put

    def submit(self, namespace: str, ids: Sequence[str], texts: Sequence[str]) -> None:
        """Queue a namespace's texts as chunks, longest first (similar lengths pad little)."""
        self.submit_many([(namespace, ids, texts)])

    def submit_many(self, parts: Sequence[tuple[str, Sequence[str], Sequence[str]]]) -> None:
        """Queue several namespaces' texts, in this order, each longest first: chunks are filled across
        namespaces, so a chunk may hold the end of one and the start of the next (100 namespaces of
        550 turns were 100 calls of 550 texts on the GPU, whose encoder wants calls of 4,096)."""
        chunks: list[tuple[int, list[str], list[str]]] = []
        ids_now: list[str] = []
        texts_now: list[str] = []
        segments: list[tuple[str, int]] = []

        def flush() -> None:
            chunk_id = next(self._ids)
            self.outstanding[chunk_id] = list(segments)
            chunks.append((chunk_id, list(ids_now), list(texts_now)))
            ids_now.clear()
            texts_now.clear()
            segments.clear()

        for namespace, ids, texts in parts:
            order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
            at = 0
            while at < len(order):
                take = order[at : at + self.chunk - len(ids_now)]
                ids_now.extend(ids[i] for i in take)
                texts_now.extend(texts[i] for i in take)
                segments.append((namespace, len(take)))
                at += len(take)
                if len(ids_now) == self.chunk:
                    flush()
        if ids_now:
            flush()
        if chunks and self.pretokenise:
            self._tokenise_then_put(chunks)
        elif chunks:
            self.broker.call("put_work", chunks)

    def _tokenise_then_put(self, chunks: list[tuple[int, list[str], list[str]]]) -> None:
        """Each chunk's texts tokenised on the flow's worker pool (gpu/encoder.tokenise, one process per
        chunk at once) and put to the encoders as its ids come back: a GPU encoder then only pads and
        runs the model (its own tokenising, GIL-bound, capped it near 76k texts/s on the H200). The
        chunks queue on the pool ahead of the level-0 rows' pieces, which are submitted after them."""
        from memstage.gpu.encoder import tokenise

        pool = workers.get_pool()
        for chunk_id, ids, texts in chunks:
            pool.submit(tokenise, texts).add_done_callback(functools.partial(self._put_tokens, chunk_id, ids))

    def _put_tokens(self, chunk_id: int, ids: list[str], future: Future) -> None:
        """A chunk's ids to the encoders (on the pool's thread); an error is raised by `collect`."""
        try:
            self.broker.call("put_work", [(chunk_id, ids, future.result())])
        except BaseException as exc:  # noqa: BLE001 - raised in the flow's thread by collect
            self._failed.append(exc)

    def pending_namespaces(self) -> set[str]:
        """Namespaces with a chunk still being encoded."""
        return {namespace for segments in self.outstanding.values() for namespace, _ in segments}

    def outstanding_rows(self) -> int:
        return sum(n for segments in self.outstanding.values() for _, n in segments)

    def collect(self, timeout: float) -> list[tuple[str, pa.Table]]:
        """(namespace, embeddings) of every chunk finished now (one pair per namespace a chunk holds),
        waiting up to `timeout` until GATHER have finished (or all that are outstanding, so the last
        one comes back at once).

        Raises when the encoders have stopped with chunks still outstanding (a crashed worker):
        what was committed stays, and rerunning the flow embeds the rest."""
        if self._failed:
            raise RuntimeError("a chunk for the encoders could not be tokenised or queued") from self._failed[
                0
            ]
        out = []
        for chunk_id, table in self.broker.call("take_results", timeout, min(GATHER, len(self.outstanding))):
            start = 0
            for namespace, rows in self.outstanding.pop(chunk_id):
                out.append((namespace, table.slice(start, rows)))
                start += rows
        if out:
            self._last_result = time.monotonic()
        elif self.outstanding and time.monotonic() - self._last_result > ALIVE_CHECK_S:
            self._check_alive()
        return out

    def _check_alive(self) -> None:
        self._last_result = time.monotonic()
        for future in self.futures:
            future.wait(timeout=0)
        states = [f.state for f in self.futures]
        if all(s.is_final() for s in states):
            for future in self.futures:
                future.result()  # raises the encoder's error, if one failed
            raise RuntimeError(f"the encoders stopped with {len(self.outstanding)} chunk(s) not embedded")

    def close(self) -> None:
        """Tell the encoders to stop (results not yet collected are dropped); `stop` waits for them."""
        self.broker.call("close")

    def stop(self) -> int:
        """Tell the encoders to stop and wait for them; returns how many texts they embedded (their
        reports: `reports`)."""
        self.close()
        self.reports = [f.result() for f in self.futures]
        return sum(r["texts"] for r in self.reports)

    def __enter__(self) -> EncoderPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()  # on error too: encoders see a closed channel and stop


def chunked(ids: Sequence[str], texts: Sequence[str], size: int) -> list[tuple[list[str], list[str]]]:
    """(ids, texts) chunks of at most `size`, longest texts first."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    return [
        ([ids[i] for i in order[s : s + size]], [texts[i] for i in order[s : s + size]])
        for s in range(0, len(order), size)
    ]


def start_encoders(config: RuntimeConfig, *, use_ray: bool) -> EncoderPool:
    """Open a channel and submit one encoder task per slot (call inside a flow run)."""
    where, slots = embedding_slots(use_ray)
    broker = open_channel(uuid.uuid4().hex, use_ray=use_ray, encoders=slots)
    futures = [run_encoder.submit(config, broker, k, slots, where) for k in range(1, slots + 1)]
    settings = get_settings()
    # on a GPU the flow's worker pool tokenises (when it has processes to spare); on CPU the encoders
    # tokenise their own chunks, each in its own process already
    pretokenise = where == "actor" and settings.encoder_pretokenise and workers.pool_size() > 1
    return EncoderPool(broker, futures, settings.encoder_chunk or CHUNK[where], pretokenise=pretokenise)
