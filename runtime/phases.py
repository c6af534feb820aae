"""Where a batch flow's wall time went: seconds per phase of the flow's own thread, and each encoder's busy time.

An ingest's result carries them (`ingest_flow`'s "phases" and "encoders"), so a user sees what the
run waited on, and bench/ingest_throughput.py prints them with each encoder's utilisation (busy
seconds / the flow's wall). Phases nest: a phase timed inside another (an index build inside the
plan) counts only for itself, so the phases add up to the time the flow's thread spent in them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# The ingest flow's phases, in the order they first run (a phase may run many times).
ORDER = (
    "start_encoders",
    "parse",
    "plan",
    "commit_events",
    "level0_rows",  # starting them (on the pool, or made here when few)
    "encoder_wait",
    "level0_wait",  # the end: waiting for level-0 rows still being made on the pool
    "commit_embeddings",
    "store_holds",  # opening the store for a commit, and its checkpoint at the close
    "index_builds",
    "index_builds_wait",  # the end: waiting for the builds that run on the pool, then their manifests
    "record_runs",
    "encoder_stop",
)


@dataclass
class Phases:
    """Wall seconds per phase (exclusive of the phases timed inside it), and the encoders' reports."""

    seconds: dict[str, float] = field(default_factory=dict)
    encoders: list[dict[str, Any]] = field(default_factory=list)
    _stack: list[list[float]] = field(default_factory=list)  # [start, seconds of nested phases]

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        frame = [time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            spent = time.perf_counter() - frame[0]
            self.add(name, spent - frame[1])
            if self._stack:
                self._stack[-1][1] += spent

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def as_dict(self) -> dict[str, float]:
        """Seconds per phase, rounded, in ORDER (phases this flow never ran are left out)."""
        names = [n for n in ORDER if n in self.seconds] + sorted(set(self.seconds) - set(ORDER))
        return {n: round(self.seconds[n], 3) for n in names}


def encoder_report(
    slot: int, texts: int, busy_s: float, before: dict[str, float], after: dict[str, float]
) -> dict[str, Any]:
    """One encoder task's report: texts, seconds inside encode calls (as the task saw them), and what
    the `Encoder` itself counted over the task's life (`Encoder.timings`: tokenising thread-seconds,
    seconds the model waited for token ids, the rest of encode). An encoder shared with other callers
    (the services actor) counts their calls too."""
    spent = {k: round(after.get(k, 0.0) - before.get(k, 0.0), 3) for k in after}
    return {"slot": slot, "texts": texts, "busy_s": round(busy_s, 3), "encoder": spent}
