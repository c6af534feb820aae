"""Candidate generation: the level-0 rows worth scoring for a question, from indexes, not a scan.

Three sources (over a namespace's memory-mapped artifacts, `LoadedNamespace`):
- dense top-K_DENSE from the level's FAISS index (exact flat, or IVF above FLAT_MAX rows);
- lexical top-K_LEX from its BM25 index (the question words' posting lists only);
- top-down through the consolidate hierarchy: the K_NODES best level-1 nodes (session/episode
  summaries; themselves found by dense and lexical top-k over the nodes) and then their turns.
The union is closed under sessions (`close_sessions`): a session's turns are all scored when any
is a candidate, so neighbour and session passes see what an exhaustive scan sees; a session longer
than LONG_SESSION turns (a namespace without sessions is one) adds only the candidates' neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from memstage.gpu.lexical_index import LexicalIndex
from memstage.gpu.vector_index import DenseIndex, pick_backend
from memstage.stores import artifacts
from memstage.tasks import scoring_device
from memstage.tasks.scoring import LevelQuery, hybrid, years_of

K_DENSE = 200
K_LEX = 200
K_NODES = 8
LONG_SESSION = 256


@dataclass
class Level:
    """One level's artifacts: rows (Arrow, memory-mapped), int8 embeddings, indexes, descendants."""

    rows: pa.Table
    codes: np.ndarray  # int8 embeddings, memory-mapped; x ~ codes * scale
    scale: np.ndarray
    mean: np.ndarray
    cov: np.ndarray
    dense: DenseIndex
    lexical: LexicalIndex
    tokens: np.ndarray
    members_ptr: np.ndarray | None = None
    members: np.ndarray | None = None

    def __len__(self) -> int:
        return self.rows.num_rows

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """float32 embeddings of `rows` (positions)."""
        return np.asarray(self.codes[rows], dtype=np.float32) * np.asarray(self.scale[rows])[:, None]

    def column(self, name: str) -> pa.Array | pa.ChunkedArray:
        """One column, indexable by row: the array when the file holds one batch, else the chunked
        column as it is (concatenating a 1M-row file's 9 batches cost ~16 ms a question)."""
        col = self.rows.column(name)
        return col.chunk(0) if col.num_chunks == 1 else col

    @cached_property
    def _batches(self) -> tuple[list[pa.RecordBatch], np.ndarray]:
        """The file's batches and their first rows, made once (a 10M-row file has ~80 batches)."""
        batches = self.rows.to_batches()
        return batches, np.cumsum([0] + [b.num_rows for b in batches])

    def take(self, rows: list[int]) -> list[dict[str, Any]]:
        """`rows` (positions) as dicts, in order, taken batch by batch: `Table.take` on a file of
        several batches concatenated every column first (31 ms a question at 1M rows)."""
        batches, bounds = self._batches
        if len(batches) <= 1:
            return self.rows.take(rows).to_pylist()
        idx = np.asarray(rows, np.int64)
        which = np.searchsorted(bounds, idx, side="right") - 1
        out: list[dict[str, Any]] = [{} for _ in rows]
        for c in np.unique(which).tolist():
            sel = np.flatnonzero(which == c)
            local = pa.array(idx[sel] - bounds[c], pa.int64())
            for k, row in zip(sel.tolist(), batches[c].take(local).to_pylist(), strict=True):
                out[k] = row
        return out


@dataclass
class LoadedNamespace:
    """One namespace's artifacts as of one manifest state; level-0 arrays in conversation order."""

    stamp: tuple
    version: int
    levels: dict[int, Level] = field(default_factory=dict)
    model: str | None = None  # the embedding model that indexed it (the manifest's)
    session: np.ndarray | None = None  # session code per level-0 row (rows of a session are adjacent)
    session_start: np.ndarray | None = None  # first row of each session code
    prev: np.ndarray | None = None  # the previous turn of the same session, or -1
    next: np.ndarray | None = None
    speaker: np.ndarray | None = None  # speaker code, -1 for none
    speakers: dict[str, int] = field(default_factory=dict)  # lower-cased name -> code
    # names the turns call a speaker by (`tasks.names`: "Hey Mel!" to Melanie, "I'm Sam" by user):
    # lower-cased name -> the speaker's code; a speaker's own name is in `speakers` only
    aliases: dict[str, int] = field(default_factory=dict)
    days: np.ndarray | None = None  # event day (days since 1970), scoring.NO_DAY for none
    # level 0 on a torch device (`tasks.scoring_device`), where every row is scored; None: candidates
    device: Any = None
    years: list[int] = field(default_factory=list)  # the years of level 0's event days

    @property
    def n(self) -> int:
        return len(self.levels[0]) if 0 in self.levels else 0


def load_level(folder: Path, level: int, backend: str | None = None, *, card_scored: bool = False) -> Level:
    """One level's artifacts, memory-mapped. `card_scored`: the level is scored whole on a card from
    its int8 codes (`tasks.scoring_device`), so its dense index is never searched there and gets no
    fp16 copy on the card (7.7 GB at 10M rows); its CPU form stays mapped, not read."""
    codes = artifacts.load_array(folder / f"L{level}.emb_i8.npy")
    scale = artifacts.load_array(folder / f"L{level}.emb_scale.npy")
    rows = artifacts.load_rows(folder / f"L{level}.rows.arrow")
    # A GPU searches every row exactly, from the float32 vectors; the CPU needs only the FAISS file.
    on_gpu = len(codes) > 0 and not card_scored and pick_backend(backend) != "faiss-cpu"
    vectors = (codes, scale) if on_gpu else None  # dequantised chunk by chunk on the way to the card
    path = folder / f"L{level}.dense.faiss"
    if card_scored:
        dense = DenseIndex.load(path, backend="faiss-cpu", mmap=True)
    else:
        dense = DenseIndex.load(path, vectors=vectors, backend=backend)
    out = Level(
        rows=rows,
        codes=codes,
        scale=scale,
        mean=np.load(folder / f"L{level}.dense_mean.npy"),
        cov=np.load(folder / f"L{level}.dense_cov.npy"),
        dense=dense,
        lexical=LexicalIndex.load(folder / f"L{level}.lexical"),
        tokens=rows.column("tokens").fill_null(0).to_numpy().astype(np.int64),
    )
    if level >= 1 and (folder / f"L{level}.members.npy").exists():
        out.members_ptr = artifacts.load_array(folder / f"L{level}.members_ptr.npy")
        out.members = artifacts.load_array(folder / f"L{level}.members.npy")
    return out


def load_namespace(folder: Path, stamp: tuple, backend: str | None = None) -> LoadedNamespace:
    """Memory-map one artifact version (no per-memory Python objects)."""
    manifest = artifacts.load_manifest(folder)
    ns = LoadedNamespace(stamp=stamp, version=int(manifest["version"]), model=manifest.get("model"))
    device = scoring_device.wanted(backend)
    for key, info in sorted(manifest["levels"].items(), key=lambda kv: int(kv[0])):
        card_scored = int(key) == 0 and scoring_device.scans_codes(device)
        ns.levels[int(key)] = load_level(folder, int(key), backend, card_scored=card_scored)
        if int(key) == 0:
            ns.speakers = {name.lower(): code for code, name in enumerate(info.get("speakers", []))}
            codes = {name: code for code, name in enumerate(info.get("speakers", []))}
            ns.aliases = {
                alias: codes[who]
                for alias, who in (info.get("aliases") or {}).items()
                if who in codes and alias not in ns.speakers
            }
    if 0 in ns.levels:
        for name in ("session", "session_start", "prev", "next", "speaker", "days"):
            setattr(ns, name, artifacts.load_array(folder / f"L0.{name}.npy"))
        if device is not None and ns.n:
            ns.years = years_of(ns.days)
            ns.device = scoring_device.device_level(ns, device)
    return ns


def top_rows(
    level: Level, q: LevelQuery, k_dense: int, k_lex: int, lexical: LevelQuery | None = None
) -> np.ndarray:
    """Union of the level's dense top-k and lexical top-k rows (sorted); the lexical ones by
    `lexical`'s words when given."""
    dense_rows, _ = level.dense.search(q.qvec, k_dense)
    lq = lexical or q
    lex_rows = lq.lex_rows
    if len(lex_rows) > k_lex:
        lex_rows = lex_rows[np.argpartition(-lq.lex_vals, k_lex - 1)[:k_lex]]
    return np.union1d(dense_rows, lex_rows).astype(np.int64)


def best_nodes(level: Level, q: LevelQuery, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best nodes of a level >= 1 by hybrid score: (rows, scores), best first."""
    rows = top_rows(level, q, k, k)
    if len(rows) == 0:
        return rows, np.zeros(0)
    scores = hybrid(level, q, rows)
    order = np.argsort(-scores, kind="stable")[:k]
    return rows[order], scores[order]


def descendants(level: Level, nodes: np.ndarray) -> np.ndarray:
    if level.members is None or len(nodes) == 0:
        return np.zeros(0, np.int64)
    parts = [np.asarray(level.members[level.members_ptr[i] : level.members_ptr[i + 1]]) for i in nodes]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def close_sessions(ns: LoadedNamespace, rows: np.ndarray) -> np.ndarray:
    """`rows` plus every turn of their sessions (of a long session: the rows' neighbours only)."""
    if len(rows) == 0:
        return rows
    codes = np.unique(np.asarray(ns.session[rows]))
    starts = np.asarray(ns.session_start)
    lo = starts[codes]
    hi = np.where(codes + 1 < len(starts), starts[np.minimum(codes + 1, len(starts) - 1)], ns.n)
    short = (hi - lo) <= LONG_SESSION
    parts = [np.arange(a, b) for a, b in zip(lo[short], hi[short], strict=True)]
    long_codes = codes[~short]
    if len(long_codes):
        near = rows[np.isin(np.asarray(ns.session[rows]), long_codes)]
        links = np.r_[near, np.asarray(ns.prev[near]), np.asarray(ns.next[near])]
        parts.append(links[links >= 0])
    return np.unique(np.concatenate(parts)).astype(np.int64)


def candidates(
    ns: LoadedNamespace,
    queries: dict[int, LevelQuery],
    *,
    hierarchy: bool = True,
    lexical: LevelQuery | None = None,
) -> tuple[np.ndarray, dict[str, int]]:
    """Level-0 rows to score (sorted, closed under sessions) and how many each source gave;
    `lexical`: the query whose BM25 top rows are candidates, when not `queries[0]`'s."""
    level0 = ns.levels[0]
    found = top_rows(level0, queries[0], K_DENSE, K_LEX, lexical)
    figures = {"index": len(found)}
    if hierarchy and 1 in ns.levels and 1 in queries:
        nodes, _ = best_nodes(ns.levels[1], queries[1], K_NODES)
        under = descendants(ns.levels[1], nodes)
        figures["hierarchy"] = int(len(np.setdiff1d(under, found)))
        found = np.union1d(found, under)
    rows = close_sessions(ns, found)
    figures["scored"] = len(rows)
    return rows, figures
