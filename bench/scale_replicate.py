"""A bench shortcut to 10M memories: a namespace built by bench/scale.py, its synthetic part copied.

    python bench/scale.py --sizes 100000 --keep ...        # a real build: stages, indexes, hierarchy
    python bench/scale_replicate.py --home /tmp/memstage-scale/n100000 --factor 100 --out /tmp/n10M

Building 10M memories through the stages takes hours (1M took 546 s on the H200 host), so this
writes the artifacts of a namespace F times the size directly. The planted conversation stays once.
Every synthetic row (session prefix `syn`) is copied F-1 times, as a new conversation:
- ids and session names get a `~rK` suffix;
- neighbour links and session codes are renumbered;
- embeddings are int8 codes plus a small fixed noise (+-2 codes, re-drawn per copy from one table);
- speakers, times and texts stay as they are.

Level 1 (session nodes) is copied the same way, its members pointing at the copies. Level 2 (topics)
is kept as it is.

Not re-fitted (the figures a search needs are still computed over all rows at query time):
- the BM25 weights are the base corpus's (a word's IDF as among the base's memories);
- the dense mean and covariance are the base's;
- the CPU IVF keeps the base's quantiser, so its lists are F times longer. A GPU does not search it:
  it scans every row, and the file is memory-mapped, not read.
The index_manifest in the copied DuckDB file points at the same paths.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memstage.gpu.lexical_index import LexicalIndex
from memstage.stores import artifacts

NOISE_ROWS = 1 << 16  # rows of the fixed noise table copies draw from
COPY_TAG = "~r"


def copied(keep: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """(source row, copy number) of every row of the result: all rows, then `factor - 1` copies of
    the kept ones."""
    kept = np.flatnonzero(keep)
    n = len(keep)
    src = np.concatenate([np.arange(n)] + [kept] * (factor - 1))
    copy = np.concatenate([np.zeros(n, np.int64)] + [np.full(len(kept), k) for k in range(1, factor)])
    return src, copy


def positions(keep: np.ndarray, factor: int) -> np.ndarray:
    """new_row[k, old_row]: where copy k of an old row lands (-1 where it is not copied)."""
    n, kept = len(keep), np.flatnonzero(keep)
    out = np.full((factor, n), -1, np.int64)
    out[0] = np.arange(n)
    for k in range(1, factor):
        out[k, kept] = n + (k - 1) * len(kept) + np.arange(len(kept))
    return out


def tagged(column: pa.Array, copy: np.ndarray) -> pa.Array:
    suffix = pa.array(np.where(copy > 0, np.char.add(COPY_TAG, copy.astype(str)), ""))
    return pc.binary_join_element_wise(column, suffix, "")


def copy_rows(rows: pa.Table, src: np.ndarray, copy: np.ndarray) -> pa.Table:
    table = rows.take(pa.array(src))
    for name in ("id", "session"):
        col = table.column(name).combine_chunks()
        table = table.set_column(table.schema.get_field_index(name), name, tagged(col, copy))
    return table


def copy_codes(codes: np.ndarray, src: np.ndarray, copy: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.integers(-2, 3, size=(NOISE_ROWS, codes.shape[1]), dtype=np.int16)
    out = np.empty((len(src), codes.shape[1]), np.int8)
    for lo in range(0, len(src), 1 << 20):
        s, k = src[lo : lo + (1 << 20)], copy[lo : lo + (1 << 20)]
        block = (
            np.asarray(codes[s], np.int16) + noise[(s * 7919 + k * 104729) % NOISE_ROWS] * (k > 0)[:, None]
        )
        out[lo : lo + len(s)] = np.clip(block, -127, 127)
    return out


def copy_lexical(path: Path, out: Path, keep: np.ndarray, pos: np.ndarray) -> None:
    """The CSC BM25 matrix with each kept row's entries repeated for its copies, column by column."""
    lex = LexicalIndex.load(path)
    indptr, indices, data = np.asarray(lex.indptr), np.asarray(lex.indices), np.asarray(lex.data)
    factor = len(pos)
    col = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    is_kept = keep[indices]
    kept_per_col = np.bincount(col[is_kept], minlength=len(indptr) - 1)
    new_ptr = np.r_[0, np.cumsum(np.diff(indptr) + (factor - 1) * kept_per_col)]
    new_idx = np.empty(new_ptr[-1], np.int32)
    new_val = np.empty(new_ptr[-1], np.float32)
    at = new_ptr[col] + (np.arange(len(col)) - indptr[col])
    new_idx[at], new_val[at] = indices, data
    kept_e = np.flatnonzero(is_kept)
    kept_ptr = np.r_[0, np.cumsum(kept_per_col)]
    rank = np.arange(len(kept_e)) - kept_ptr[col[kept_e]]
    for k in range(1, factor):
        at = new_ptr[col[kept_e]] + np.diff(indptr)[col[kept_e]] + (k - 1) * kept_per_col[col[kept_e]] + rank
        new_idx[at], new_val[at] = pos[k, indices[kept_e]], data[kept_e]
    LexicalIndex(len(pos[0]) + (factor - 1) * int(keep.sum()), new_val, new_idx, new_ptr, lex.vocab).save(out)


def dense_file(base: Path, out: Path, codes: np.ndarray, scale: np.ndarray) -> str:
    """The CPU FAISS form: a flat index as the base's was one, else its IVF refilled (same quantiser)."""
    index = faiss.read_index(str(base))
    kind = "ivf" if isinstance(index, faiss.IndexIVF) else "flat"
    index.reset()
    for lo in range(0, len(codes), 1 << 18):
        index.add(np.asarray(codes[lo : lo + (1 << 18)], np.float32) * scale[lo : lo + (1 << 18), None])
    faiss.write_index(index, str(out))
    return kind


def copy_members(
    folder: Path, out: Path, lvl: int, src: np.ndarray, copy: np.ndarray, pos0: np.ndarray
) -> None:
    """Level `lvl`'s members (level-0 positions under each node) for the copied nodes."""
    ptr = np.asarray(artifacts.load_array(folder / f"L{lvl}.members_ptr.npy"), np.int64)
    members = np.asarray(artifacts.load_array(folder / f"L{lvl}.members.npy"), np.int64)
    lengths = np.diff(ptr)[src]
    new_ptr = np.r_[0, np.cumsum(lengths)]
    at = np.repeat(ptr[src] - new_ptr[:-1], lengths) + np.arange(new_ptr[-1])
    new_members = pos0[np.repeat(copy, lengths), members[at]]
    artifacts.save_array(out / f"L{lvl}.members_ptr.npy", new_ptr)
    artifacts.save_array(out / f"L{lvl}.members.npy", new_members.astype(members.dtype))


def copy_level(folder: Path, out: Path, lvl: int, keep: np.ndarray, factor: int) -> tuple[dict, np.ndarray]:
    """Rows, embeddings, statistics and both indexes of one level; returns its manifest entry and
    where each copy of each row landed."""
    src, copy = copied(keep, factor)
    rows = artifacts.load_rows(folder / f"L{lvl}.rows.arrow")
    artifacts.save_rows(out / f"L{lvl}.rows.arrow", copy_rows(rows, src, copy))
    codes = copy_codes(artifacts.load_array(folder / f"L{lvl}.emb_i8.npy"), src, copy)
    scale = np.asarray(artifacts.load_array(folder / f"L{lvl}.emb_scale.npy"))[src]
    artifacts.save_array(out / f"L{lvl}.emb_i8.npy", codes)
    artifacts.save_array(out / f"L{lvl}.emb_scale.npy", scale)
    for name in ("dense_mean", "dense_cov"):
        shutil.copy(folder / f"L{lvl}.{name}.npy", out / f"L{lvl}.{name}.npy")
    kind = dense_file(folder / f"L{lvl}.dense.faiss", out / f"L{lvl}.dense.faiss", codes, scale)
    copy_lexical(folder / f"L{lvl}.lexical", out / f"L{lvl}.lexical", keep, positions(keep, factor))
    return {"count": len(src), "dense_kind": kind}, (src, copy)


def copy_structure(folder: Path, out: Path, src: np.ndarray, copy: np.ndarray, pos: np.ndarray) -> None:
    """Level 0's session codes (renumbered in row order), neighbour links, speakers and days."""
    session = np.asarray(artifacts.load_array(folder / "L0.session.npy"))[src]
    change = np.r_[True, (session[1:] != session[:-1]) | (copy[1:] != copy[:-1])]
    artifacts.save_array(out / "L0.session.npy", (np.cumsum(change) - 1).astype(session.dtype))
    artifacts.save_array(out / "L0.session_start.npy", np.flatnonzero(change).astype(np.int64))
    for name in ("prev", "next"):
        link = np.asarray(artifacts.load_array(folder / f"L0.{name}.npy"))[src]
        moved = np.where(link >= 0, pos[copy, np.maximum(link, 0)], -1)
        artifacts.save_array(out / f"L0.{name}.npy", moved.astype(link.dtype))
    for name in ("speaker", "days"):
        artifacts.save_array(
            out / f"L0.{name}.npy", np.asarray(artifacts.load_array(folder / f"L0.{name}.npy"))[src]
        )


def replicate(home: Path, out: Path, factor: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(home, out)
    [folder] = [p for p in (home / "indexes").glob("*/v*") if p.is_dir()]
    target = out / folder.relative_to(home)
    manifest = artifacts.load_manifest(folder)
    session = artifacts.load_rows(folder / "L0.rows.arrow").column("session").combine_chunks()
    keep0 = pc.starts_with(session, "syn").to_numpy(zero_copy_only=False)
    entry0, (src, copy) = copy_level(folder, target, 0, keep0, factor)
    pos0 = positions(keep0, factor)
    copy_structure(folder, target, src, copy, pos0)
    manifest["levels"]["0"].update(entry0)
    if "1" in manifest["levels"]:
        ptr = np.asarray(artifacts.load_array(folder / "L1.members_ptr.npy"), np.int64)
        members = np.asarray(artifacts.load_array(folder / "L1.members.npy"), np.int64)
        kept_members = np.add.reduceat(keep0[members], ptr[:-1]) if len(members) else np.zeros(0)
        keep1 = (kept_members == np.diff(ptr)) & (np.diff(ptr) > 0)
        entry1, (src1, copy1) = copy_level(folder, target, 1, keep1, factor)
        copy_members(folder, target, 1, src1, copy1, pos0)
        manifest["levels"]["1"].update(entry1)
    artifacts.save_manifest(target, {k: v for k, v in manifest.items() if k != "format"})
    return {"memories": int(entry0["count"]), "planted_rows": int((~keep0).sum()), "factor": factor}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True, help="a data directory bench/scale.py kept")
    ap.add_argument("--factor", type=int, required=True, help="copies of the synthetic part, >= 2")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.factor < 2:
        ap.error("--factor must be at least 2")
    start = time.perf_counter()
    figures = replicate(args.home, args.out, args.factor)
    figures["replicate_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(figures), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
