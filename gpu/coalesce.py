"""Concurrent calls merged into batches run by one thread: the encoder and the retriever of a server
under many clients.

Why: `memstage serve` answers each request on a thread. Under 32 concurrent clients on the 2-core
machine, 32 single-text forward passes (each using every core) queued behind one another: p95 1.86 s
against 134 ms for one client (bench/results/wide_cpu.json, before this). One pass over 32 short
questions costs little more than one over a single question. And 32 threads each running a
retrieval's many small numpy steps hand the GIL to one another at every step: the same retrieval
cost 2.2 ms of CPU under 32 clients against 1.05 ms alone. One thread running them one after another
pays neither.

`Coalescer.submit` is leader/follower, with no thread of its own and no waiting window: a call that
finds the coalescer idle runs one batch of everything queued at that moment (its own item included);
calls that arrive meanwhile queue, and when the batch ends the oldest of them leads the next batch
over all that queued. One caller alone pays nothing extra; n callers pay about one batch each round
instead of n. Each caller gets its own result, as soon as the batch has made it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Request(Generic[T]):
    item: T
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # set with `done`: this caller runs the next batch instead of having a result
    result: Any = None
    error: BaseException | None = None


class Coalescer(Generic[T, R]):
    """Runs `run_batch(items)` over queued items; it yields one result per item, in order (an exception
    instance yielded for an item is raised in that item's caller). Thread-safe.

    `size(item)` counts an item against `max_size` (a batch takes at least one item)."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], Iterable[R | BaseException]],
        max_size: int = 256,
        size: Callable[[T], int] = lambda _: 1,
    ) -> None:
        self.run_batch = run_batch
        self.max_size = max_size
        self.size = size
        self._lock = threading.Lock()
        self._queue: list[_Request[T]] = []
        self._busy = False
        self.batches = 0  # batches run, for tests and figures
        self.calls = 0

    def submit(self, item: T) -> R:
        req = _Request(item)
        with self._lock:
            self.calls += 1
            self._queue.append(req)
            lead = not self._busy
            self._busy = True
        if not lead:
            req.done.wait()
        if lead or req.lead:
            self._run()
            req.done.wait()  # set by the batch that held this request (this one, or an earlier one)
        if req.error is not None:
            raise req.error
        return req.result

    def _take(self) -> list[_Request[T]]:
        with self._lock:
            batch, n = [], 0
            while self._queue and (not batch or n + self.size(self._queue[0].item) <= self.max_size):
                req = self._queue.pop(0)
                batch.append(req)
                n += self.size(req.item)
            return batch

    def _run(self) -> None:
        batch = self._take()
        done = 0
        try:
            for req, result in zip(batch, self.run_batch([r.item for r in batch]), strict=False):
                if isinstance(result, BaseException):
                    req.error = result
                else:
                    req.result = result
                done += 1
                req.done.set()  # its caller goes on while the batch runs the next items
            if done < len(batch):
                raise RuntimeError(f"a batch of {len(batch)} gave {done} results")
        except BaseException as exc:  # noqa: BLE001 - handed to every caller still waiting, raised there
            for req in batch[done:]:
                req.error = exc
        with self._lock:
            self.batches += 1
            nxt = self._queue[0] if self._queue else None
            if nxt is None:
                self._busy = False
            else:
                nxt.lead = True
        for req in batch[done:]:
            req.done.set()
        if nxt is not None:
            nxt.done.set()  # it wakes, sees `lead`, and runs the next batch


class CoalescingEncoder:
    """Wraps any object with `encode(texts) -> ndarray` (rows in order) so that concurrent calls share
    forward passes; thread-safe. Results are the wrapped encoder's, row for row."""

    def __init__(self, encoder: Any, max_texts: int = 256) -> None:
        self.encoder = encoder
        self._coalescer: Coalescer[list[str], np.ndarray] = Coalescer(self._pass, max_texts, len)

    @property
    def passes(self) -> int:
        return self._coalescer.batches

    @property
    def calls(self) -> int:
        return self._coalescer.calls

    def encode(self, texts: Sequence[str], **kwargs: Any) -> np.ndarray:
        if kwargs:  # a caller with its own batch options encodes alone
            return self.encoder.encode(texts, **kwargs)
        return self._coalescer.submit(list(texts))

    def _pass(self, batch: list[list[str]]) -> Iterable[np.ndarray]:
        vectors = self.encoder.encode([t for texts in batch for t in texts])
        start = 0
        for texts in batch:
            yield vectors[start : start + len(texts)]
            start += len(texts)
