"""Concurrent encode calls merged into one forward pass: the encoder of a server under many clients.

Why: `memstage serve` answers each request on a thread, and each encodes its question alone. Under 32
concurrent clients on the 2-core machine, 32 single-text forward passes (each using every core)
queued behind one another: p95 1.86 s against 134 ms for one client (bench/results/wide_cpu.json,
before this). One pass over 32 short questions costs little more than one over a single question.

`CoalescingEncoder.encode` is leader/follower, with no thread of its own and no waiting window: a
call that finds the encoder idle runs one pass over everything queued at that moment (its own texts
included); calls that arrive meanwhile queue, and when the pass ends the oldest of them leads the
next pass over all that queued. One client alone pays nothing extra; n clients pay about one pass
each round instead of n. Results are the wrapped encoder's, row for row.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class _Request:
    texts: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # set with `done`: this caller runs the next pass instead of having a result
    result: np.ndarray | None = None
    error: BaseException | None = None


class CoalescingEncoder:
    """Wraps any object with `encode(texts) -> ndarray` (rows in order); thread-safe."""

    def __init__(self, encoder: Any, max_texts: int = 256) -> None:
        self.encoder = encoder
        self.max_texts = max_texts
        self._lock = threading.Lock()
        self._queue: list[_Request] = []
        self._busy = False
        self.passes = 0  # forward passes run (one per batch), for tests and figures
        self.calls = 0

    def encode(self, texts: Sequence[str], **kwargs: Any) -> np.ndarray:
        if kwargs:  # a caller with its own batch options encodes alone
            return self.encoder.encode(texts, **kwargs)
        req = _Request(list(texts))
        with self._lock:
            self.calls += 1
            self._queue.append(req)
            lead = not self._busy
            self._busy = True
        if not lead:
            req.done.wait()
        if lead or req.lead:
            self._run_pass()
            req.done.wait()  # set by the pass that held this request (this one, or an earlier one)
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def _take(self) -> list[_Request]:
        with self._lock:
            batch, n = [], 0
            while self._queue and (not batch or n + len(self._queue[0].texts) <= self.max_texts):
                req = self._queue.pop(0)
                batch.append(req)
                n += len(req.texts)
            return batch

    def _run_pass(self) -> None:
        batch = self._take()
        try:
            vectors = self.encoder.encode([t for r in batch for t in r.texts])
            start = 0
            for r in batch:
                r.result = vectors[start : start + len(r.texts)]
                start += len(r.texts)
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the pass, raised there
            for r in batch:
                r.error = exc
        with self._lock:
            self.passes += 1
            nxt = self._queue[0] if self._queue else None
            if nxt is None:
                self._busy = False
            else:
                nxt.lead = True
        for r in batch:
            r.done.set()
        if nxt is not None:
            nxt.done.set()  # it wakes, sees `lead`, and runs the next pass
