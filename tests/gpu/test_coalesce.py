"""Concurrent encodes share forward passes and get exactly their own rows back (the real encoder)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from memstage.gpu.coalesce import CoalescingEncoder

QUESTIONS = [f"What did person {i} say about the trip to city {i % 7}?" for i in range(24)]


class Slow:
    """The real encoder behind a gate, so that calls pile up while the first pass runs."""

    def __init__(self, encoder, gate: threading.Event) -> None:
        self.encoder, self.gate, self.batches = encoder, gate, []

    def encode(self, texts):
        self.gate.wait(10)
        self.batches.append(len(texts))
        return self.encoder.encode(texts)


def test_concurrent_questions_share_passes_and_get_their_own_rows(encoder):
    gate = threading.Event()
    slow = Slow(encoder, gate)
    coalescing = CoalescingEncoder(slow)
    out: dict[int, np.ndarray] = {}

    def ask(i: int) -> None:
        out[i] = coalescing.encode([QUESTIONS[i]])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    while coalescing.calls < len(QUESTIONS):  # every caller queued behind the gated first pass
        threading.Event().wait(0.01)
    gate.set()
    for t in threads:
        t.join(30)
    alone = encoder.encode(QUESTIONS)
    for i in range(len(QUESTIONS)):
        assert out[i].shape == (1, alone.shape[1])
        np.testing.assert_allclose(out[i][0], alone[i], atol=1e-5)
    # the first pass held the first caller's question; all the others shared the next one
    assert coalescing.passes == 2 and sorted(slow.batches) == [1, len(QUESTIONS) - 1]


def test_one_caller_alone_is_one_pass_and_errors_reach_every_caller(encoder):
    coalescing = CoalescingEncoder(encoder)
    np.testing.assert_allclose(coalescing.encode(QUESTIONS[:3]), encoder.encode(QUESTIONS[:3]), atol=1e-5)
    assert coalescing.passes == 1

    class Broken:
        def encode(self, texts):
            raise RuntimeError("card gone")

    with pytest.raises(RuntimeError, match="card gone"):
        CoalescingEncoder(Broken()).encode(["x"])


def test_batches_of_whole_calls_deliver_each_result_or_its_own_error():
    """The generic Coalescer (what `memstage serve` batches retrievals with): queued calls run as one
    batch, each caller gets its own result, and an item's exception is raised in its caller only."""
    from memstage.gpu.coalesce import Coalescer

    gate, seen = threading.Event(), []

    def run(items):
        gate.wait(10)
        seen.append(list(items))
        for x in items:
            yield ValueError(f"bad {x}") if x < 0 else x * 10

    co = Coalescer(run, max_size=64)
    out: dict[int, object] = {}

    def call(x: int) -> None:
        try:
            out[x] = co.submit(x)
        except ValueError as exc:
            out[x] = str(exc)

    threads = [threading.Thread(target=call, args=(x,)) for x in [1, 2, -3, 4, 5]]
    threads[0].start()
    while co.calls < 1:
        threading.Event().wait(0.01)
    for t in threads[1:]:
        t.start()
    while co.calls < 5:
        threading.Event().wait(0.01)
    gate.set()
    for t in threads:
        t.join(10)
    assert out == {1: 10, 2: 20, -3: "bad -3", 4: 40, 5: 50}
    assert seen[0] == [1] and sorted(seen[1]) == [-3, 2, 4, 5] and co.batches == 2
