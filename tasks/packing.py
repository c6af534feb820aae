"""Packing: ranked memories into a token budget, greedily in rank order.

What does not fit is skipped (a shorter memory further down may still fit) and packing stops once
fewer than MIN_LEFT tokens are left. `pack_sizes` is the rule over an array of sizes, `pack_ranked`
the rule as `tasks.retrieve.Retriever.retrieve` applies it to a question's ranked rows: with excerpts
(`tasks.excerpt`, off by default) and without the sentences already packed (`tasks.repeats`, on by
default; off, only exact copies of a packed memory are skipped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np

from memstage.tasks.repeats import Repeats

MIN_LEFT = 5  # stop packing once fewer tokens than this are left
PACK_WINDOW = 256

T = TypeVar("T")


def pack_within_budget(
    ranked: Iterable[T],
    tokens: Callable[[T], int],
    budget: int,
    *,
    key: Callable[[T], str] | None = None,
) -> tuple[list[T], int]:
    """Greedy packing in rank order: what does not fit is skipped (a shorter item further down may
    still fit), items with an already packed `key` are skipped, and packing stops once fewer than
    MIN_LEFT tokens are left. Returns (packed items, tokens used)."""
    items = list(ranked)
    sizes = np.fromiter((tokens(item) for item in items), np.int64, count=len(items))
    picked, used = pack_sizes(sizes, budget, None if key is None else lambda j: key(items[j]))
    return [items[j] for j in picked], used


def pack_sizes(
    sizes: np.ndarray,
    budget: int,
    key: Callable[[int], str] | None = None,
    settle: Callable[[int, int], None] | None = None,
    admit: Callable[[int], int | None] | None = None,
) -> tuple[list[int], int]:
    """`pack_within_budget` over positions 0..len(sizes)-1: the positions packed, and the tokens. The
    next position that fits is found by numpy, PACK_WINDOW at a time (a Python step per ranked row
    was ~3 ms of a question scored on a card, whose 4096 best rows rarely fill a budget exactly).
    `settle(lo, hi)`, when given, makes `sizes[lo:hi]` final in place before they are read (excerpts:
    `tasks.excerpt.Excerpts`). `admit(j)`, when given, is asked for a row that fits: the tokens it
    costs (at most its size), or None to skip it (`tasks.repeats.Repeats`)."""
    packed: list[int] = []
    used, seen, i = 0, set(), 0
    while i < len(sizes):
        if settle is not None:
            settle(i, i + 1)
        if sizes[i] <= budget - used:  # the next row fits: most rows, while the budget is open
            j = i
        else:
            if settle is not None:
                settle(i + 1, i + PACK_WINDOW)
            fits = np.flatnonzero(sizes[i + 1 : i + PACK_WINDOW] <= budget - used)
            if len(fits) == 0:
                i += PACK_WINDOW
                continue
            j = i + 1 + int(fits[0])
        i = j + 1
        k = key(j) if key is not None else None
        if k is not None and k in seen:
            continue
        size = int(sizes[j]) if admit is None else admit(j)
        if size is None:
            continue
        used += size
        seen.add(k)
        packed.append(j)
        if budget - used < MIN_LEFT:
            break
    return packed, used


def pack_ranked(
    text_of: Callable[[int], str],
    sizes: np.ndarray,
    budget: int,
    *,
    cuts: Any | None = None,
    drop_repeats: bool = True,
    counter: Any | None = None,
) -> tuple[list[int], int, list[Any]]:
    """Ranked positions (text `text_of(j)`, tokens `sizes[j]`) packed into `budget`: (positions packed,
    tokens used, the shorteners whose `mark(picked, memories)` puts the shortened texts in the result).
    `cuts`: an `Excerpts` settling the sizes; `drop_repeats`: leave out the sentences already packed
    (`Repeats`, counting a shortened text with `counter`), else skip only exact copies."""

    def text(j: int) -> str:
        return cuts.made[j][0] if cuts is not None and j in cuts.made else text_of(j)

    repeats = Repeats(text, sizes, counter) if drop_repeats else None
    key = None if repeats is not None else lambda j: " ".join(text(j).lower().split())
    settle = None if cuts is None else cuts.settle
    picked, used = pack_sizes(sizes, budget, key, settle, None if repeats is None else repeats.admit)
    return picked, used, [m for m in (cuts, repeats) if m is not None]
