"""Repeats: a sentence already packed for a question is not packed again.

An assistant's long answer restates what was just said; quoted replies, retried messages and pasted
text repeat a history's sentences verbatim. Packed whole, each copy spends the budget again on
sentences the reader already has. `Repeats` admits the ranked memories as the greedy packing
(`tasks.packing.pack_sizes`, its `admit`) reaches them, keeping the sentences packed so far (lower-
cased words, the speaker label and punctuation set aside):
- a memory none of whose sentences of MIN_WORDS words or more is new is skipped (it adds nothing),
  and so is an exact copy of a packed memory (the rule packing had before);
- a memory with some sentences already packed goes in without them (the gaps marked "…"), and costs
  the budget only the tokens of what is left (counted with the store's counter, the generator's
  tokenizer). It says so as an excerpt does (`excerpt`, `full_tokens`), so a caller can fetch it whole;
- any other memory goes in whole. Nothing is reordered and no score changes; the information
  packed is the same, in fewer tokens.

It is on by default (MEMSTAGE_DROP_REPEATS=0 turns it off) and has no fitted parameter. Measured by
`bench/excerpt_packing.py --repeats` through `Retriever.retrieve` on the dev split and every robustness
variant, against packing with exact copies skipped only, in the same run (bench/results/repeats_cpu.md).
Recall@250/500/1000/2000 with the eval's credit: ontopic 0.557/0.659/0.739/0.815 ->
0.584/0.693/0.774/0.851 (strict credit 0.651 -> 0.699 and answer credit 0.495 -> 0.523 at 1000;
its long turns repeat their session's other turns word for word); assistant 0.781 -> 0.782, long
0.816 -> 0.819, padded 0.843 -> 0.843 at 1000; dev and dated unchanged at every budget; speakers
0.869 -> 0.868 at 1000 (at the budget's edge: one question's evidence, 40th in the ranking, no
longer fit once the rows above it were shortened, and another question gained half; +0.001 at 500
and 2000). Retrieval p95 at 1000 tokens +1.0 ms on dev, +2.2 ms on ontopic
(bench/results/repeats_latency_cpu.md).

Only the packing changes. `memstage eval`'s exhaustive reference packs as the index path does (the
same `Retriever.retrieve`), so the two stay comparable; its raw-turn baselines (dense, BM25, RRF)
pack whole turns as before.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from memstage.tasks.passages import _parts, _pieces

WHOLE = 1 << 30  # sentences are compared whole (`_pieces` cuts none this long)
# A sentence of fewer words ("Caroline!", "Thanks.", "Wow.") says nothing by itself: it is never left
# out and never makes a memory a repeat; an exact copy of a packed memory is skipped whatever it holds.
# Set by that reading, not fitted: counting them too shortened 3.9 memories a question on the
# `speakers` variant (mostly a lone vocative the compress stage leaves, "Caroline.") for no recall.
MIN_WORDS = 3
_WORDS = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def sentence_keys(text: str) -> tuple[str | None, list[str], list[str]]:
    """(speaker label, sentences, their keys) of a memory's text `speaker: body [image caption]`:
    a key is the sentence's lower-cased words joined by one space; sentences without a word are
    left out."""
    speaker, body, caption = _parts(text)
    pieces, keys = [], []
    for piece in _pieces(body, WHOLE) + ([caption] if caption else []):
        key = " ".join(_WORDS.findall(piece.lower()))
        if key:
            pieces.append(piece)
            keys.append(key)
    return speaker, pieces, keys


class Repeats:
    """`admit(j)` for `pack_sizes`: the tokens position `j` costs packed without the sentences already
    packed, or None when it adds no sentence (module docstring). `text_of(j)` gives its text and
    `sizes[j]` its whole size; `counter.count(text)` counts a shortened text (None: the whole size
    scaled by the words kept, rounded up). `made[j]` = (text, tokens) of each position shortened."""

    def __init__(self, text_of: Callable[[int], str], sizes: np.ndarray, counter: Any | None) -> None:
        self.text_of, self.sizes, self.counter = text_of, sizes, counter
        self.packed: set[str] = set()  # keys of the sentences packed (of MIN_WORDS words or more)
        self.copies: set[str] = set()  # the whole texts packed, normalised
        self.made: dict[int, tuple[str, int]] = {}

    def admit(self, j: int) -> int | None:
        text = self.text_of(j) or ""
        whole = int(self.sizes[j])
        exact = " ".join(text.lower().split())
        if exact in self.copies:  # an exact copy, whatever its sentences
            return None
        speaker, pieces, keys = sentence_keys(text)
        said = [len(k.split()) >= MIN_WORDS for k in keys]  # the sentences compared
        new = [not s or k not in self.packed for k, s in zip(keys, said, strict=True)]
        if any(said) and not any(n and s for n, s in zip(new, said, strict=True)):
            return None  # every sentence that says something is packed already
        self.copies.add(exact)
        self.packed.update(k for k, s in zip(keys, said, strict=True) if s)
        if all(new):
            return whole
        short = _without(speaker, pieces, new)
        n = self._count(short, whole, pieces, new)
        if n >= whole:  # nothing saved (a rare tokenizer merge): packed as it is
            return whole
        self.made[j] = (short, n)
        return n

    def mark(self, picked: list[int], memories: list[dict[str, Any]]) -> None:
        """The packed memories (`picked` positions, in order) that went in shortened get the shorter
        text and tokens, `excerpt`, and their whole memory's tokens as `full_tokens`."""
        for j, m in zip(picked, memories, strict=True):
            if j in self.made:
                text, n = self.made[j]
                m.update(text=text, tokens=n, excerpt=True, full_tokens=m.get("full_tokens", m["tokens"]))

    def _count(self, short: str, whole: int, pieces: list[str], new: list[bool]) -> int:
        if self.counter is not None:
            return int(self.counter.count(short))
        kept = sum(len(p.split()) for p, n in zip(pieces, new, strict=True) if n)
        return max(1, math.ceil(whole * kept / max(sum(len(p.split()) for p in pieces), 1)))


def _without(speaker: str | None, pieces: list[str], new: list[bool]) -> str:
    """The text of the new sentences, in order, a gap marked "…" where sentences were left out."""
    parts: list[str] = []
    for piece, keep in zip(pieces, new, strict=True):
        if keep:
            parts.append(piece)
        elif not parts or parts[-1] != "…":
            parts.append("…")
    body = " ".join(parts)
    return f"{speaker}: {body}" if speaker else body
