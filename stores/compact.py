"""Rewrite the DuckDB file so that deleted rows leave no bytes behind (the last step of a hard forget).

DuckDB marks the blocks of deleted or updated rows free and reuses them later; until then their old
bytes stay in the file, and a checkpoint alone does not clear them. `rewrite_database` copies every
table into a fresh file (`COPY FROM DATABASE`) and swaps it in, all under the writer lock, so only
live rows survive. `find_bytes` is the check: which files under a folder contain a string.
"""

from __future__ import annotations

import mmap
import os
import re
from pathlib import Path

import duckdb

from memstage.stores.store import MemoryStore, StoreError


def rewrite_database(store: MemoryStore) -> dict[str, int]:
    """Copy the live contents of the store's database into a new file and replace the old one with it."""
    db = store.db_path
    tmp = db.with_name(db.name + ".rewrite")
    with store._mutex:  # same package: the store's own lock discipline, not a second one
        if store._conn is not None:
            raise StoreError("rewrite_database inside an open writer(): commit first")
        lock_fd = store._acquire_lock()
        try:
            for stale in (tmp, Path(str(tmp) + ".wal")):
                stale.unlink(missing_ok=True)
            size_before = db.stat().st_size
            conn = duckdb.connect(str(db))
            try:
                conn.execute("CHECKPOINT")
                name = conn.execute("SELECT current_database()").fetchone()[0]
                conn.execute(f"ATTACH '{tmp}' AS _fresh")
                conn.execute(f'COPY FROM DATABASE "{name}" TO _fresh')
                conn.execute("DETACH _fresh")
            finally:
                conn.close()
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, db)
            Path(str(db) + ".wal").unlink(missing_ok=True)  # closed after a checkpoint: nothing pending in it
            return {"bytes_before": size_before, "bytes_after": db.stat().st_size}
        finally:
            import fcntl

            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)


def find_bytes(root: Path, needle: str) -> list[Path]:
    """Files under `root` whose bytes contain `needle` (UTF-8, case-insensitive)."""
    return find_bytes_in(sorted(Path(root).rglob("*")), needle)


def find_bytes_in(paths: list[Path], needle: str) -> list[Path]:
    """Those of `paths` (regular files) whose bytes contain `needle` (UTF-8, case-insensitive)."""
    pattern = re.compile(re.escape(needle.encode("utf-8")), re.IGNORECASE)
    hits = []
    for path in paths:
        if not path.is_file() or path.is_symlink():
            continue
        if path.stat().st_size == 0:
            continue
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if pattern.search(mm):
                hits.append(path)
    return hits


def tables_holding(store: MemoryStore, needle: str) -> list[str]:
    """'table.column' of every text column of the store holding `needle` (case-insensitive): the
    byte search's finer second look, and what it cannot see (compressed strings)."""
    columns = store.query(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE data_type = 'VARCHAR' OR data_type LIKE '%[]' ORDER BY table_name, column_name"
    ).to_pylist()
    hits = []
    for c in columns:
        t, col = c["table_name"], c["column_name"]
        n = store.query(
            f'SELECT count(*) AS n FROM "{t}" WHERE contains(lower(CAST("{col}" AS VARCHAR)), lower(?))',
            [needle],
        )
        if n.column("n")[0].as_py():
            hits.append(f"{t}.{col}")
    return hits
