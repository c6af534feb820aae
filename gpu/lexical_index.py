"""Lexical (BM25) index over memory texts, with bm25s: the exact-word complement of the vector index.

Saved as a folder of arrays plus a sidecar of ids; the vocabulary is part of the artifact, so a
hard forget must rebuild it (a removed memory's words would otherwise stay in `vocab.index.json`).
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

_TOKEN = re.compile(r"(?u)\b\w\w+\b")


class LexicalIndex:
    """BM25 over a fixed set of (id, text); rebuilt, not edited, when the set changes."""

    def __init__(self, ids: Sequence[str], texts: Sequence[str], *, k1: float = 1.2, b: float = 0.75) -> None:
        self.ids = list(ids)
        self._bm25 = bm25s.BM25(k1=k1, b=b)
        if self.ids:
            tokens = bm25s.tokenize(list(texts), stopwords="en", show_progress=False)
            self._bm25.index(tokens, show_progress=False)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, query: str, k: int) -> tuple[list[str], np.ndarray]:
        """Top-k ids with positive BM25 score, best first."""
        k = min(k, len(self.ids))
        if k == 0 or not _TOKEN.search(query):
            return [], np.zeros(0, np.float32)
        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not any(len(t) for t in tokens.ids):
            return [], np.zeros(0, np.float32)
        rows, scores = self._bm25.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        keep = scores[0] > 0
        return [self.ids[r] for r in rows[0][keep]], scores[0][keep]

    def save(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if self.ids:
            self._bm25.save(str(tmp), show_progress=False)
        (tmp / "ids.json").write_text(json.dumps(self.ids))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> LexicalIndex:
        path = Path(path)
        index = cls.__new__(cls)
        index.ids = json.loads((path / "ids.json").read_text())
        index._bm25 = bm25s.BM25.load(str(path), show_progress=False) if index.ids else bm25s.BM25()
        return index
