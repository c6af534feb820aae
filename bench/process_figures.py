"""Process figures a bench records: this process's RSS, the card memory torch holds, a phase's
seconds and peak RSS (bench/scale.py and the benches that build on it)."""

from __future__ import annotations

import os
import time
from typing import Any


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def card_mb() -> float | None:
    """Memory torch holds on the card (the loaded namespace's copies), or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    return round(torch.cuda.memory_allocated() / 2**20) if torch.cuda.is_available() else None


def timed(fn, *a, **kw) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*a, **kw)
    return out, round(time.perf_counter() - start, 2)


class PeakRss:
    """This process's peak RSS within a phase, sampled every 0.2 s on a thread (ru_maxrss never
    goes back down, so it cannot tell phases apart)."""

    def __init__(self) -> None:
        import threading

        self.peak = rss_mb()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.2)

    def phase(self, figures: dict[str, float], name: str, fn, *a, **kw) -> Any:
        """Run `fn`; record `{name}_s` and `{name}_peak_mb` in `figures`."""
        self.peak = rss_mb()
        out, figures[f"{name}_s"] = timed(fn, *a, **kw)
        figures[f"{name}_peak_mb"] = round(max(self.peak, rss_mb()))
        return out
