"""Excerpts: a packed level-0 memory of more than `words` words cut, at retrieval time, to the sentences
that share most of the question's scored words, so that more memories fit a token budget.

A long turn's passage (`tasks.passages`, up to ~80 words) costs 80-100 tokens where a short turn
costs ~25; packed whole, few fit. `Excerpts` settles the packing sizes of ranked level-0 rows lazily
(`tasks.retrieve.pack_sizes` asks for a range before it reads it): a row of more than `words` words
whose sentences share a scored word with the question is cut to its best run of consecutive
sentences within `words` words (the run holding the most BM25 idf of the question's words, each
counted once; a cut marked "…"), and its size becomes the excerpt's real token count (the store's
counter, the generator's tokenizer). A row none of whose sentences shares a word keeps its whole
text (it was found by meaning; a blind cut could drop the evidence), and so does any row past the
first MAX_EXCERPTS long ones, which bounds the cost of a question. Each row's sentences and their
stemmed words are cached on the loaded namespace, so a question pays a dictionary look-up and one
token count per excerpt. The packed memory says it is one (`excerpt`, `full_tokens`; `tokens` is what
it cost the budget), so a caller can fetch the whole memory by its id.

Off by default (MEMSTAGE_EXCERPT_WORDS=0): bench/excerpt_packing.py measured it on the dev split and
every robustness variant. At 40 words recall with the eval's credit rose everywhere (long 0.816 ->
0.830 at 1000 tokens) while strict credit (the packed text holds half the evidence turn's words)
and answer credit fell everywhere at 1000-2000 tokens (dev strict 0.861 -> 0.846, answer 0.628 ->
0.609): lexical overlap picks the wrong run of sentences often enough to cut the evidence. At 60
words (the dev split's leave-one-conversation-out choice) no figure moved by more than 0.007.
`density_order` (score per token breaking near-ties) lost on the dev split at every margin tried.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from memstage.gpu.lexical_index import analyse
from memstage.tasks.passages import _parts, _pieces

MAX_EXCERPTS = 64  # long rows excerpted per question at most; later ones are packed whole
CACHE_ROWS = 200_000  # rows whose sentences are kept per namespace (the cache is emptied beyond)


@dataclass(frozen=True)
class Sentences:
    """A level-0 text as its speaker label, sentences (the image caption last) and their stems."""

    speaker: str | None
    pieces: tuple[str, ...]
    stems: tuple[frozenset[str], ...]
    words: int


def sentences(text: str, width: int) -> Sentences:
    """`text` (`speaker: body [shared an image: ...]`) split as `tasks.passages` splits a turn, each
    sentence of more than `width` words cut into runs of `width`."""
    speaker, body, caption = _parts(text)
    pieces = _pieces(body, width) + ([caption] if caption else [])
    stems = tuple(frozenset(s) for s in analyse(pieces)) if pieces else ()
    return Sentences(speaker, tuple(pieces), stems, sum(len(p.split()) for p in pieces))


def idf(lexical: Any, words: Sequence[str]) -> dict[str, float]:
    """BM25's idf of each of `words` in the namespace's level-0 lexical index (its posting lengths);
    a word the index lacks is left out (no row holds it)."""
    out = {}
    n = max(int(lexical.n), 1)
    for w in dict.fromkeys(words):
        col = lexical.vocab.get(w)
        if col is not None:
            df = int(lexical.indptr[col + 1] - lexical.indptr[col])
            out[w] = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
    return out


def cut(s: Sentences, weights: dict[str, float], words: int) -> str | None:
    """The excerpt of `s`: the run of consecutive sentences within `words` words (as long as fits)
    whose sentences hold the most weight of the question's words (each word once), ties to the run
    that sets its matching sentences most centrally (context on both sides); None when no sentence
    holds a weighted word or the run would be the whole text."""
    sizes = [len(p.split()) for p in s.pieces]
    hits = [stems & weights.keys() for stems in s.stems]
    if not any(hits):
        return None
    best: tuple[float, int, int, int] | None = None
    for a in range(len(sizes)):
        b, size = a + 1, sizes[a]
        while b < len(sizes) and size + sizes[b] <= words:
            size += sizes[b]
            b += 1
        value = sum(weights[w] for w in set().union(*hits[a:b]))
        matched = [k for k in range(a, b) if hits[k]]
        if not matched:
            continue
        margin = min(sum(sizes[a : matched[0]]), sum(sizes[matched[-1] + 1 : b]))
        if best is None or (value, margin) > best[:2]:
            best = (value, margin, a, b)
        if b == len(sizes):
            break
    _, _, a, b = best
    if a == 0 and b == len(sizes):
        return None
    body = ("… " if a > 0 else "") + " ".join(s.pieces[a:b]) + (" …" if b < len(sizes) else "")
    return f"{s.speaker}: {body}" if s.speaker else body


class Excerpts:
    """The sizes of ranked rows settled for packing (module docstring): `settle(lo, hi)` makes
    `sizes[lo:hi]` final, in place; `made[j]` = (text, tokens) of each position packed as an excerpt."""

    def __init__(
        self,
        ns: Any,
        levels: np.ndarray,
        rows: np.ndarray,
        sizes: np.ndarray,
        scored: Sequence[str],
        counter: Any,
        words: int,
    ) -> None:
        self.ns, self.levels, self.rows, self.sizes = ns, levels, rows, sizes
        self.counter, self.words = counter, words
        self.weights = idf(ns.levels[0].lexical, scored)
        self.made: dict[int, tuple[str, int]] = {}
        self.done = 0  # positions below are settled
        self.tried = 0
        # a text of more than `words` words has more than `words` tokens: the others are never cut
        self.long = (levels == 0) & (sizes > words) if self.weights else np.zeros(len(rows), bool)

    def settle(self, lo: int, hi: int) -> None:
        hi = min(hi, len(self.rows))
        if hi <= self.done or self.tried >= MAX_EXCERPTS:
            self.done = max(self.done, hi)
            return
        for j in np.flatnonzero(self.long[self.done : hi]).tolist():
            if self.tried >= MAX_EXCERPTS:
                break
            self.tried += 1
            self._shrink(self.done + j)
        self.done = hi

    def mark(self, picked: list[int], memories: list[dict[str, Any]]) -> None:
        """The packed memories (`picked` positions, in order) that went in as excerpts get the
        excerpt's text and tokens, `excerpt`, and their whole memory's tokens as `full_tokens`."""
        for j, m in zip(picked, memories, strict=True):
            if j in self.made:
                text, n = self.made[j]
                m.update(text=text, tokens=n, excerpt=True, full_tokens=m["tokens"])

    def _shrink(self, j: int) -> None:
        s = self._sentences(int(self.rows[j]))
        if s.words <= self.words:
            return
        text = cut(s, self.weights, self.words)
        if text is None:
            return
        n = self.counter.count(text)
        if n < self.sizes[j]:
            self.sizes[j] = n
            self.made[j] = (text, n)

    def _sentences(self, row: int) -> Sentences:
        cache = self.ns.__dict__.setdefault("_excerpt_sentences", {})
        key = (row, self.words)
        got = cache.get(key)
        if got is None:
            if len(cache) >= CACHE_ROWS:
                cache.clear()
            got = cache[key] = sentences(self.ns.levels[0].column("text")[row].as_py() or "", self.words)
        return got


DENSITY_REF = 32  # tokens of a short turn: a memory this long or shorter pays no density cost


def density_order(*ranked: np.ndarray, per_doubling: float = 0.0) -> tuple[np.ndarray, ...]:
    """Ranked (levels, rows, scores, sizes) in the packing order where score per token breaks
    near-ties: by score less `per_doubling` for each doubling of a memory's tokens over DENSITY_REF
    (stable: equal keys keep the ranking's order), so a long memory yields to a short one scored
    within that margin."""
    scores, sizes = ranked[2], ranked[3]
    cost = per_doubling * np.log2(np.maximum(sizes, DENSITY_REF) / DENSITY_REF)
    order = np.argsort(-(scores - cost), kind="stable")
    return tuple(a[order] for a in ranked)
