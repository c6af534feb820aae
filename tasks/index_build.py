"""Index build: a namespace's columnar artifacts, dense and lexical indexes, as one versioned folder.

`build_indexes` (tasks/build_batch.py, which builds many namespaces at once) reads the namespace's active memories once (`stores.index_reads.namespaces_rows`, a
hash join to their source events), and writes `indexes/<ns>/v<N>/` (layout: `stores.artifacts`):
per level the rows retrieval returns (Arrow IPC), embeddings (int8 with a scale per row; their mean and covariance make a question's dense z-score over the
whole level exact without scanning it), a FAISS index
(flat or IVF, `gpu.vector_index`), a BM25 index over the text each memory is found by
(`tasks.index.index_text`); for level 0 session codes, neighbour links, event days, speaker
codes and the names the turns call each speaker by (`tasks.names`, in the manifest); for levels
>= 1 the level-0 positions under each node (top-down search). Skipped when the namespace's
fingerprint (ids, texts, found-by texts, speaker names, parents, tokens, sessions, times) is
unchanged, so a second run changes nothing; any change rebuilds every level as the next version.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memstage.gpu.encoder import model_info
from memstage.gpu.lexical_index import LexicalIndex
from memstage.gpu.vector_index import DenseIndex, build_cpu_index
from memstage.stores import artifacts, index_reads
from memstage.stores.store import MemoryStore
from memstage.tasks.contract import StageResult
from memstage.tasks.names import learn_names
from memstage.tasks.passages import turn_of

KINDS = ("columns", "dense", "lexical")
TURN_LINKS = True  # passages of a turn share the turn's neighbours (`neighbour_links`)


def found_by_texts(part: pa.Table) -> list[str]:
    """`index_text` of each row: a level-0 memory is found by its source turns' full words (a passage
    of a long turn by its own words)."""
    from memstage.tasks.index import index_text

    texts = part.column("text").to_pylist()
    if part.num_rows == 0 or int(part.column("level")[0].as_py()) != 0:
        return texts
    columns = ("metadata", "speaker", "events")
    values = [part.column(c).to_pylist() if c in part.column_names else [None] * len(texts) for c in columns]
    return [
        index_text({"level": 0, "text": text, "metadata": meta, "speaker": speaker}, events or [])
        for text, meta, speaker, events in zip(texts, *values, strict=True)
    ]


def speaker_names(part: pa.Table | None) -> dict[str, str]:
    """Names the level-0 turns call their speakers by (`tasks.names`): name -> speaker; each turn read
    once (a long turn's passages share its events)."""
    if part is None or part.num_rows == 0 or "events" not in part.column_names:
        return {}
    ids, sessions = part.column("id").to_pylist(), part.column("session").to_pylist()
    events = part.column("events").to_pylist()
    return learn_names(
        (session, e.get("speaker"), e.get("text"))
        for mid, session, evs in zip(ids, sessions, events, strict=True)
        if turn_of(mid) == mid
        for e in evs or []
    )


def fingerprint(rows: pa.Table, found_by: dict[int, list[str]], names: dict[str, str] | None = None) -> str:
    """Hash of everything the artifacts are made of (the embeddings follow the texts)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(names or {}, sort_keys=True).encode())
    cols = (
        "id",
        "level",
        "text",
        "tokens",
        "parent",
        "event_ids",
        "session",
        "speaker",
        "event_time",
        "seq",
        "flag",
    )
    for name in cols:  # values, not Arrow buffers (chunking and validity bitmaps vary between reads)
        h.update(json.dumps(rows.column(name).to_pylist(), default=str).encode())
    for level in sorted(found_by):
        h.update(json.dumps(found_by[level]).encode())
    return h.hexdigest()


def embedding_matrix(column: pa.ChunkedArray, dims: int | None = None) -> np.ndarray:
    """The embeddings as one float32 matrix of `dims` columns (the model in use, by default); a clear
    error when they were made by a model of other dimensions."""
    dims = dims or model_info().dims
    lengths = pc.list_value_length(column)
    if len(column) and (pc.min(lengths).as_py() != dims or pc.max(lengths).as_py() != dims):
        raise ValueError(
            f"stored embeddings have {pc.min(lengths).as_py()}-{pc.max(lengths).as_py()} dimensions, the "
            f"embedding model in use {dims} (MEMSTAGE_ENCODER_MODEL): a namespace is indexed with the "
            "model that embedded it; ingest it again into a new data directory to change models"
        )
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(-1, dims)


def quantize(emb: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and a float32 scale per row (x ~ codes * scale): a quarter of float32's bytes, and
    numpy widens int8 ~30x faster than float16; cosine error ~1e-3, the same for every search path.
    In row chunks: the float32 temporaries of the whole matrix were 3 GB at 1M rows."""
    scale = np.abs(emb).max(axis=1) / 127.0 if len(emb) else np.zeros(0, np.float32)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = np.empty(emb.shape, np.int8)
    for lo in range(0, len(emb), chunk):
        codes[lo : lo + chunk] = np.round(emb[lo : lo + chunk] / scale[lo : lo + chunk, None])
    return codes, scale


def dequantize(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.asarray(codes, dtype=np.float32) * np.asarray(scale)[:, None]


EXACT_ROWS = (
    20_000  # up to this many rows the covariance is summed in float64 by one BLAS thread (see moments)
)
_blas: Any = (
    None  # threadpoolctl's controller of this process's BLAS, made on first use (None: not installed)
)


def gram(x: np.ndarray) -> np.ndarray:
    """x' x by one BLAS thread, whatever this process's BLAS runs otherwise: BLAS's sums depend on its
    thread count, so a namespace's files are the same bits built in a pool process or in the flow's
    (tested). 7x faster than einsum's own loop (3.5 against 23 ms for 552 rows here), which it falls
    back to where threadpoolctl is missing."""
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController

            _blas = ThreadpoolController()
        except ImportError:
            _blas = False
    if _blas is False:
        return np.einsum("ri,rj->ij", x, x, optimize=False)
    with _blas.limit(limits=1, user_api="blas"):
        return x.T @ x


def moments(
    emb: np.ndarray, chunk: int = 65536, scale: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the rows (float64): q.mean and sqrt(q' cov q) are a question's dense
    score mean and sd over the level, exactly. Up to EXACT_ROWS rows in float64 by one BLAS thread
    (`gram`: the same bits in the pool or inline). Above, BLAS in float32 chunks (a million rows would take einsum about 25 s). With
    `scale`, `emb` holds int8 codes, dequantised a chunk at a time (as `dequantize`)."""
    n, dims = len(emb), (emb.shape[1] if emb.ndim == 2 and emb.shape[1] else model_info().dims)
    if n == 0:
        return np.zeros(dims), np.zeros((dims, dims))
    if n <= EXACT_ROWS:
        x = np.asarray(emb if scale is None else dequantize(emb, scale), dtype=np.float64)
        mean = x.sum(0) / n
        return mean, gram(x) / n - np.outer(mean, mean)
    total, outer = np.zeros(dims), np.zeros((dims, dims))
    for lo in range(0, n, chunk):
        x = np.asarray(emb[lo : lo + chunk], dtype=np.float32)
        if scale is not None:
            x *= np.asarray(scale[lo : lo + chunk])[:, None]
        total += x.sum(0, dtype=np.float64)
        outer += (x.T @ x).astype(np.float64)
    mean = total / n
    return mean, outer / n - np.outer(mean, mean)


def neighbour_links(ids: list[str], change: np.ndarray) -> dict[str, np.ndarray]:
    """Per level-0 row, the row of the previous and of the next turn of its session (-1 for none).
    With TURN_LINKS the passages of one turn (`tasks.passages`, adjacent rows) share their turn's
    neighbours, so each passage of an answer sits next to the question before it, as the whole turn
    did; without, adjacent rows are neighbours."""
    n = len(ids)
    if n == 0:
        return {"prev": np.zeros(0, np.int32), "next": np.zeros(0, np.int32)}
    turn = np.asarray([turn_of(i) if TURN_LINKS else i for i in ids], dtype=object)
    new_turn = change | np.r_[True, turn[1:] != turn[:-1]]
    starts = np.flatnonzero(new_turn)
    group = np.cumsum(new_turn) - 1
    first, last = starts[group], (np.r_[starts[1:], n] - 1)[group]
    session_ends_after = np.r_[change[1:], True]  # the row after this one starts a session (or none)
    return {
        "prev": np.where(change[first], -1, first - 1).astype(np.int32),
        "next": np.where(session_ends_after[last], -1, last + 1).astype(np.int32),
    }


def level0_columns(part: pa.Table) -> dict[str, np.ndarray]:
    """Session codes and their start rows, neighbour links, speaker codes, event days of level 0."""
    n = part.num_rows
    session = np.asarray(part.column("session").fill_null("").to_pylist(), dtype=object)
    change = np.r_[True, session[1:] != session[:-1]] if n else np.zeros(0, bool)
    codes = (np.cumsum(change) - 1).astype(np.int32)
    speakers = part.column("speaker").fill_null("")
    names = sorted({s for s in pc.unique(speakers).to_pylist() if s})
    speaker = pc.index_in(speakers, value_set=pa.array(names, pa.string())).fill_null(-1)
    days = pc.cast(pc.cast(part.column("event_time"), pa.date32()), pa.int32()).fill_null(
        np.iinfo(np.int32).min
    )
    return {
        "session": codes,
        "session_start": np.flatnonzero(change).astype(np.int32),
        **neighbour_links(part.column("id").to_pylist(), change),
        "speaker": speaker.to_numpy(zero_copy_only=False).astype(np.int32),
        "days": days.to_numpy(zero_copy_only=False).astype(np.int32),
        "_names": names,
    }


def members(levels: dict[int, pa.Table]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per level >= 1: (ptr, level-0 positions) in CSR form, the descendants of each node."""
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if 0 not in levels:
        return out
    below = np.arange(levels[0].num_rows)  # node position at the level above, per level-0 row
    parents = levels[0].column("parent")
    for level in sorted(lvl for lvl in levels if lvl >= 1):
        ids = levels[level].column("id")
        pos = pc.index_in(parents, value_set=ids).fill_null(-1).to_numpy(zero_copy_only=False)
        if level == 1:
            below = pos.astype(np.int64)
        else:  # a level-l node's descendants: the level-0 rows whose level-(l-1) node points at it
            below = np.where(below >= 0, pos[np.maximum(below, 0)], -1) if len(pos) else below * 0 - 1
        order = np.argsort(below, kind="stable")
        keep = order[below[order] >= 0]
        counts = np.bincount(below[keep], minlength=levels[level].num_rows)
        out[level] = (np.r_[0, np.cumsum(counts)].astype(np.int64), keep.astype(np.int32))
        parents = levels[level].column("parent")
    return out


def write_level(
    folder: Path,
    level: int,
    part: pa.Table,
    found_by: list[str],
    kids: Any,
    names: dict[str, str] | None = None,
) -> dict[str, Any]:
    emb = (
        embedding_matrix(part.column("embedding"))
        if part.num_rows
        else np.zeros((0, model_info().dims), np.float32)
    )
    codes, scale = quantize(emb)
    rows = pa.table(
        {
            name: part.column(name) if name in part.column_names else pa.nulls(part.num_rows)
            for name in artifacts.ROWS.names
        }
    ).cast(artifacts.ROWS)
    artifacts.save_rows(folder / f"L{level}.rows.arrow", rows)
    artifacts.save_array(folder / f"L{level}.emb_i8.npy", codes)
    artifacts.save_array(folder / f"L{level}.emb_scale.npy", scale)
    mean, cov = moments(codes, scale=scale)
    artifacts.save_array(folder / f"L{level}.dense_mean.npy", mean)
    artifacts.save_array(folder / f"L{level}.dense_cov.npy", cov)
    dense = DenseIndex(build_cpu_index(emb), backend="faiss-cpu")
    dense.save(folder / f"L{level}.dense.faiss")
    LexicalIndex.build(found_by).save(folder / f"L{level}.lexical")
    info: dict[str, Any] = {"count": part.num_rows, "dense_kind": dense.kind}
    if level == 0:
        cols = level0_columns(part)
        info["speakers"] = cols.pop("_names")
        info["aliases"] = dict(names or {})  # name -> speaker, learned from the turns (tasks.names)
        for name, array in cols.items():
            artifacts.save_array(folder / f"L0.{name}.npy", array)
    elif kids is not None:
        artifacts.save_array(folder / f"L{level}.members_ptr.npy", kids[0])
        artifacts.save_array(folder / f"L{level}.members.npy", kids[1])
    return info


@dataclass
class BuildJob:
    """A namespace whose artifacts must be rebuilt: what `write_artifacts` writes, and its manifest."""

    namespace: str
    index_dir: Path
    version: int
    fingerprint: str
    levels: dict[int, pa.Table]
    found_by: dict[int, list[str]]
    memories: int
    names: dict[str, str] = field(default_factory=dict)


@dataclass
class Written:
    """What a build wrote (returned by a pool process: no tables): its manifest rows' content."""

    namespace: str
    index_dir: Path
    version: int
    fingerprint: str
    memories: int
    infos: dict[int, Any]


def plan_build(store: MemoryStore, namespace: str, result: StageResult) -> BuildJob | None:
    """Read the namespace's rows; None (with `result.figures` set) when its indexes are current."""
    rows = index_reads.namespaces_rows(store, [namespace])[namespace]
    current = store.current_indexes(namespace)
    return plan_job(namespace, store.index_dir(namespace), rows, current, result)


def plan_job(
    namespace: str, index_dir: Path, rows: pa.Table, current_rows: pa.Table, result: StageResult
) -> BuildJob | None:
    """`plan_build` of rows already read (`index_reads.namespaces_rows`, `current_manifests`)."""
    levels = index_reads.split_levels(rows)
    found_by = {lvl: found_by_texts(part) for lvl, part in levels.items()}
    names = speaker_names(levels.get(0))
    fp = fingerprint(rows, found_by, names)
    current = current_rows.select(["level", "kind", "version", "fingerprint"]).to_pylist()
    have = {(r["level"], r["kind"]) for r in current}
    fresh = all((lvl, k) in have for lvl in levels for k in KINDS) and len(have) == len(levels) * len(KINDS)
    if (current and fresh and all(r["fingerprint"] == fp for r in current)) or (
        rows.num_rows == 0 and not current
    ):
        result.figures = {"levels_rebuilt": [], "memories_indexed": rows.num_rows}
        return None
    if rows.column("embedding").null_count:
        raise RuntimeError(f"{namespace}: memories without embeddings; run embed_missing first")
    version = max((r["version"] for r in current), default=0) + 1
    return BuildJob(namespace, index_dir, version, fp, levels, found_by, rows.num_rows, names)


def write_artifacts(job: BuildJob) -> dict[int, Any]:
    """Write the job's version folder (files only: runs in a pool process as well as here)."""
    kids = members(job.levels)
    infos: dict[int, Any] = {}
    model = model_info()

    def write(folder: Path) -> None:
        for lvl, part in job.levels.items():
            infos[lvl] = write_level(folder, lvl, part, job.found_by[lvl], kids.get(lvl), job.names)
        artifacts.save_manifest(
            folder, {"version": job.version, "model": model.name, "dims": model.dims, "levels": infos}
        )

    artifacts.write_version(job.index_dir, job.version, write)
    return infos


def plan_and_write(
    namespace: str, index_dir: Path, rows: pa.Table, current: pa.Table
) -> tuple[Written | None, dict[str, Any], float]:
    """`plan_job` then `write_artifacts` of one namespace (in a pool process, or here): what was
    written (None when current), the figures of a namespace left as it was, and the seconds taken."""
    start = time.perf_counter()
    result = StageResult("index.build", namespace)
    job = plan_job(namespace, index_dir, rows, current, result)
    if job is None:
        return None, result.figures, time.perf_counter() - start
    infos = write_artifacts(job)
    written = Written(namespace, index_dir, job.version, job.fingerprint, job.memories, infos)
    return written, {}, time.perf_counter() - start


def remove_stale_artifacts(store: MemoryStore, namespace: str) -> list[Path]:
    """Delete index files no current manifest row points at (old versions hold old, maybe forgotten, text)."""
    keep = {store.home / p for p in store.current_indexes(namespace).column("path").to_pylist()}
    return artifacts.remove_stale(store.index_dir(namespace), keep)
