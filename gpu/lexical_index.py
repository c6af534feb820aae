"""Lexical (BM25) index over memory texts: built once by the index stage, memory-mapped by the retriever.

bm25s computes every (document, word) BM25 weight at build time into a CSC sparse matrix (one
column per vocabulary word); `save` writes it as npy arrays plus the vocabulary, `load` memory-maps
them, so opening a 1M-document index reads only the vocabulary. A question's scores are the sum of
its words' columns (`sparse_scores`, touching only the documents that hold a question word), and
the statistics for z-scoring over the whole index come from the same columns exactly: documents
holding none of the words score 0. The vocabulary is part of the artifact, so a hard forget must
rebuild it (a removed memory's words would otherwise stay in `vocab.index.json`).

Texts are analysed with `analyse`: bm25s' word pattern and English stopwords, and Snowball's English
stemmer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import bm25s
import numpy as np
import Stemmer
from bm25s.stopwords import STOPWORDS_EN

# Snowball's English stemmer (PyStemmer, C): "camped", "camping" -> "camp"; the same for texts and questions.
_STEMMER = Stemmer.Stemmer("english")


# bm25s' own word pattern and English stopwords (`bm25s.tokenize`'s defaults), applied here without
# its per-call tqdm and per-text stopword set (one text at a time over 2,000 dev turns, this 2-core
# machine: 7 us a text against 37). tests/gpu/test_indexes.py
# checks the words are bm25s' on every LoCoMo dev turn.
_WORDS = re.compile(r"(?u)\b\w\w+\b").findall
_STOPWORDS = frozenset(STOPWORDS_EN)


def analyse(texts: Sequence[str]) -> list[list[str]]:
    """Words of each text as BM25 sees them (lower-cased, stopwords out, stemmed)."""
    return [_STEMMER.stemWords([w for w in _WORDS(text.lower()) if w not in _STOPWORDS]) for text in texts]


class LexicalIndex:
    """BM25 over a fixed list of texts (rows 0..n-1); rebuilt, not edited, when the list changes."""

    def __init__(
        self, n: int, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, vocab: dict
    ) -> None:
        self.n = n
        # plain ndarray views of memory-mapped artifacts: np.memmap's per-index __array_finalize__ was
        # a quarter of a served query's scoring time under load (py-spy); the pages stay mapped
        self.data, self.indices, self.indptr = np.asarray(data), np.asarray(indices), np.asarray(indptr)
        self.vocab = vocab

    def __len__(self) -> int:
        return self.n

    @classmethod
    def build(cls, texts: Sequence[str], *, k1: float = 1.5, b: float = 0.75) -> LexicalIndex:
        bm25 = bm25s.BM25(k1=k1, b=b)
        tokens = analyse(texts) if len(texts) else []
        if not any(tokens):
            return cls(len(texts), np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(1, np.int64), {})
        bm25.index(tokens, show_progress=False)
        s = bm25.scores
        return cls(
            len(texts),
            np.asarray(s["data"], np.float32),
            np.asarray(s["indices"], np.int32),
            np.asarray(s["indptr"], np.int64),
            dict(bm25.vocab_dict),
        )

    def _columns(self, words: Sequence[str]) -> list[int]:
        return [self.vocab[w] for w in words if w in self.vocab]

    def sparse_scores(self, words: Sequence[str]) -> tuple[np.ndarray, np.ndarray, float, float]:
        """(rows with a score > 0, their scores, mean and standard deviation over all n rows)."""
        cols = self._columns(words)
        if not cols or self.n == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), 0.0, 0.0
        acc = np.zeros(self.n, np.float32)
        touched = []
        for c in cols:  # a column's rows are distinct, so `+=` with fancy indexing adds each once
            lo, hi = int(self.indptr[c]), int(self.indptr[c + 1])
            rows = np.asarray(self.indices[lo:hi])
            acc[rows] += self.data[lo:hi]
            touched.append(rows)
        if len(touched) == 1:
            rows = np.sort(touched[0]).astype(np.int64)
        else:
            mask = np.zeros(self.n, bool)
            for r in touched:
                mask[r] = True
            rows = np.flatnonzero(mask)
        vals = acc[rows]
        mean = float(vals.sum(dtype=np.float64)) / self.n
        var = float(np.square(vals, dtype=np.float64).sum()) / self.n - mean * mean
        return rows, vals, mean, float(np.sqrt(max(var, 0.0)))

    def plus_words(
        self, rows: np.ndarray, vals: np.ndarray, words: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """`sparse_scores`' (rows, values) of some words with `words`' columns added: the scores of
        both word lists at the cost of `words`' posting lists alone (a rare name's: a few hundred)."""
        parts_r, parts_v = [np.asarray(rows, np.int64)], [np.asarray(vals, np.float32)]
        for c in self._columns(words):
            lo, hi = int(self.indptr[c]), int(self.indptr[c + 1])
            parts_r.append(np.asarray(self.indices[lo:hi], np.int64))
            parts_v.append(np.asarray(self.data[lo:hi], np.float32))
        if len(parts_r) == 1:
            return parts_r[0], parts_v[0]
        out, inverse = np.unique(np.concatenate(parts_r), return_inverse=True)
        return out, np.bincount(inverse, weights=np.concatenate(parts_v)).astype(np.float32)

    def dense_scores(self, words: Sequence[str]) -> np.ndarray:
        """One score per row (the exhaustive form of `sparse_scores`)."""
        out = np.zeros(self.n, np.float32)
        rows, vals, _, _ = self.sparse_scores(words)
        out[rows] = vals
        return out

    def top(self, words: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray, float, float]:
        """The k best rows (unordered), their scores, and the mean/sd over all rows."""
        rows, vals, mean, sd = self.sparse_scores(words)
        if len(rows) > k:
            keep = np.argpartition(-vals, k - 1)[:k]
            rows, vals = rows[keep], vals[keep]
        return rows, vals, mean, sd

    def save(self, path: Path) -> None:
        """A folder of npy arrays and the vocabulary, written to a temp folder and renamed."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "data.npy", self.data)
        np.save(tmp / "indices.npy", self.indices)
        np.save(tmp / "indptr.npy", self.indptr)
        (tmp / "vocab.json").write_text(json.dumps({"n": self.n, "vocab": self.vocab}, ensure_ascii=False))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> LexicalIndex:
        path = Path(path)
        meta = json.loads((path / "vocab.json").read_text())
        arrays = [_mmap(path / f"{name}.npy") for name in ("data", "indices", "indptr")]
        return cls(int(meta["n"]), *arrays, meta["vocab"])


def _mmap(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # numpy cannot map an empty array
        return np.load(path)
