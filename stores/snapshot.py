"""Stage work away from the data directory: a namespace's rows as Arrow tables out, a scratch store built
from them on any machine, and the rows, deletions and index files a stage changed there, committed back.

The flow's process reads a `Snapshot` of one namespace (its rows of every table a stage reads, and
the policy file) and hands it to a worker through Ray's object store. The worker builds a scratch
store from it in a temporary folder of its own (never the data directory), runs the stage there
unchanged, and returns `Changes`: per table the rows that are new or different and the keys that
are gone, plus the index files the stage wrote. The flow's process commits them, in order, one
transaction per batch (`apply`): the only writer of the data directory is the flow's process.
A row's access count and last access are the store's at commit time (queries may have been merged
since the snapshot; no stage changes them).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from memstage.stores import schema
from memstage.stores.store import MemoryStore, Writer, conform, validate_namespace

# What a stage may read or write of a namespace (`runs` is the flow's, written after the commit).
TABLES = ("events", "memories", "ops", "quarantine", "index_manifest")
FILES = ("policies.json",)  # data-directory files a stage reads (tasks/forget.py's policy)
_KEPT = ("access_count", "last_access")  # the store's values win: only the access journal moves them


@dataclass
class Snapshot:
    namespace: str
    tables: dict[str, pa.Table]
    files: dict[str, bytes] = field(default_factory=dict)  # path relative to the data directory -> bytes


@dataclass
class Changes:
    namespace: str
    upserts: dict[str, pa.Table] = field(default_factory=dict)
    deletes: dict[str, pa.Table] = field(default_factory=dict)  # the primary-key columns of removed rows
    files: dict[str, bytes] = field(default_factory=dict)  # new index files, relative to the data dir

    @property
    def rows(self) -> int:
        return sum(t.num_rows for t in self.upserts.values()) + sum(t.num_rows for t in self.deletes.values())


def read(store: MemoryStore, namespace: str) -> Snapshot:
    """The namespace's rows of every table a stage reads, and the files it reads (flow side)."""
    validate_namespace(namespace)
    tables = {t: store.query(f"SELECT * FROM {t} WHERE namespace = ?", [namespace]) for t in TABLES}
    files = {f: (store.home / f).read_bytes() for f in FILES if (store.home / f).exists()}
    return Snapshot(namespace, tables, files)


@contextlib.contextmanager
def scratch(snapshot: Snapshot) -> Iterator[MemoryStore]:
    """A store in a temporary folder holding the snapshot (worker side); removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="memstage-scratch-"))
    try:
        store = MemoryStore(folder)
        with store.writer() as w:
            for table, rows in snapshot.tables.items():
                w.insert(table, rows)
        for rel, data in snapshot.files.items():
            (folder / rel).write_bytes(data)
        yield store
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def diff(store: MemoryStore, snapshot: Snapshot) -> Changes:
    """What the stage changed in the scratch `store` against `snapshot` (worker side)."""
    ns = snapshot.namespace
    out = Changes(ns)
    with store.hold(), store.writer() as w:  # a writer: the registered tables live on its connection
        for table in TABLES:
            keys = ", ".join(schema.PRIMARY_KEYS[table])
            w.conn.register("_before", conform(snapshot.tables[table], schema.TABLES[table]))
            try:
                up = w.query(f"SELECT * FROM {table} WHERE namespace = ? EXCEPT SELECT * FROM _before", [ns])
                gone = w.query(
                    f"SELECT {keys} FROM _before EXCEPT SELECT {keys} FROM {table} WHERE namespace = ?", [ns]
                )
            finally:
                w.conn.unregister("_before")
            if up.num_rows:
                out.upserts[table] = up
            if gone.num_rows:
                out.deletes[table] = gone
    index_dir = store.home / "indexes" / ns
    if index_dir.exists():
        for path in sorted(p for p in index_dir.rglob("*") if p.is_file()):
            out.files[str(path.relative_to(store.home))] = path.read_bytes()
    return out


def apply(store: MemoryStore, batch: Sequence[Changes]) -> int:
    """Commit changes of several namespaces, in order, in one transaction (flow side); index files are
    written first (new version folders: nothing current is overwritten), stale ones removed after."""
    for changes in batch:
        for rel, data in changes.files.items():
            path = (store.home / rel).resolve()
            if store.home.resolve() / "indexes" / validate_namespace(changes.namespace) not in path.parents:
                raise ValueError(f"index file outside its namespace's folder: {rel!r}")
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    written = 0
    with store.writer() as w:
        for changes in batch:
            for table, keys in changes.deletes.items():
                written += _delete(w, table, changes.namespace, keys)
            for table, rows in changes.upserts.items():
                if table == "memories":
                    rows = _with_stored_access(w, changes.namespace, rows)
                w.insert(table, rows, replace=True)
                written += rows.num_rows
    from memstage.stores.artifacts import remove_stale

    for changes in batch:
        if "index_manifest" in changes.upserts:
            keep = {
                store.home / p for p in store.current_indexes(changes.namespace).column("path").to_pylist()
            }
            remove_stale(store.index_dir(changes.namespace), keep)
    return written


def _delete(w: Writer, table: str, namespace: str, keys: pa.Table) -> int:
    cols = schema.PRIMARY_KEYS[table]
    w.conn.register("_gone", keys.select(list(cols)))
    try:
        match = " AND ".join(f"{table}.{c} = _gone.{c}" for c in cols)
        w.execute(
            f"DELETE FROM {table} WHERE namespace = ? AND EXISTS (SELECT 1 FROM _gone WHERE {match})",
            [validate_namespace(namespace)],
        ).fetchall()
    finally:
        w.conn.unregister("_gone")
    return keys.num_rows


def _with_stored_access(w: Writer, namespace: str, rows: pa.Table) -> pa.Table:
    stored = w.query(
        "SELECT id, access_count, last_access FROM memories WHERE namespace = ? AND id IN (SELECT unnest(?))",
        [namespace, rows.column("id").to_pylist()],
    ).to_pylist()
    if not stored:
        return rows
    now = {r["id"]: r for r in stored}
    ids = rows.column("id").to_pylist()
    for col in _KEPT:
        old = rows.column(col).to_pylist()
        new = [now[i][col] if i in now else v for i, v in zip(ids, old, strict=True)]
        rows = rows.set_column(
            rows.schema.get_field_index(col), col, pa.array(new, rows.schema.field(col).type)
        )
    return rows
