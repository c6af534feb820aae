"""Columnar index artifacts of a namespace: the rows the index stage writes them from, and their files.

One version of a namespace's artifacts is one folder, `indexes/<namespace>/v<N>/`, written whole
into a temp folder and renamed: `manifest.json` (format, counts, what each file is), per level an
Arrow IPC file of the rows retrieval returns (`L<l>.rows.arrow`, uncompressed so it memory-maps),
npy arrays (embeddings int8 with a scale per row, token counts, session codes, neighbour links, event days, speaker
codes, the level-0 positions under each node) and the dense and lexical indexes. Readers
memory-map everything; nothing per memory becomes a Python object at load. The `index_manifest`
rows point at the folder's files; files no current row points at are stale and removed (old
versions hold old, maybe forgotten, text).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

FORMAT = 1

ROWS = pa.schema(
    [
        ("id", pa.string()),
        ("level", pa.int8()),
        ("text", pa.string()),
        ("tokens", pa.int32()),
        ("event_ids", pa.list_(pa.string())),
        ("dia_ids", pa.list_(pa.string())),
        ("session", pa.string()),
        ("event_time", pa.timestamp("us", tz="UTC")),
        ("speaker", pa.string()),
        ("flag", pa.string()),
    ]
)


def commit_manifest(store: Any, namespace: str, rows: pa.Table) -> None:
    """Retire the namespace's current manifest rows and insert `rows` (the new version), in one transaction."""
    commit_manifests(store, {namespace: rows})


def commit_manifests(store: Any, rows: dict[str, pa.Table]) -> None:
    """`commit_manifest` of several namespaces, in one transaction."""
    if not rows:
        return
    with store.writer() as w:
        for namespace in rows:
            w.execute(
                "UPDATE index_manifest SET current = false WHERE namespace = ? AND current", [namespace]
            )
        w.insert("index_manifest", pa.concat_tables(list(rows.values())))


def version_dir(index_dir: Path, version: int) -> Path:
    return Path(index_dir) / f"v{version}"


def write_version(index_dir: Path, version: int, write: Any) -> Path:
    """Call `write(tmp_folder)` and rename the folder to `v<version>` (a half-written one never shows)."""
    final = version_dir(index_dir, version)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def save_rows(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def load_rows(path: Path) -> pa.Table:
    """The rows table, memory-mapped (zero copy)."""
    return ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def save_array(path: Path, array: np.ndarray) -> None:
    np.save(path, np.ascontiguousarray(array))


def load_array(path: Path) -> np.ndarray:
    """The array memory-mapped, as a plain ndarray view of the mapping (np.memmap's __array_finalize__ on
    every index op was a sixth of a served query's samples under 32 clients; the pages stay mapped)."""
    try:
        return np.asarray(np.load(path, mmap_mode="r"))
    except ValueError:  # numpy cannot map an empty array
        return np.load(path)


def save_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (Path(folder) / "manifest.json").write_text(json.dumps({"format": FORMAT, **manifest}, indent=1))


def load_manifest(folder: Path) -> dict[str, Any]:
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{folder}: artifact format {manifest.get('format')}, this memstage reads {FORMAT}; "
            "rebuild with `memstage run index`"
        )
    return manifest


def remove_stale(index_dir: Path, keep: set[Path]) -> list[Path]:
    """Delete every entry of `index_dir` that is not (and does not hold) a kept path."""
    index_dir = Path(index_dir)
    keep_top = {
        index_dir / Path(p).relative_to(index_dir).parts[0] for p in keep if index_dir in Path(p).parents
    }
    removed = []
    if not index_dir.exists():
        return removed
    for path in index_dir.iterdir():
        if path not in keep_top:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
    return removed
