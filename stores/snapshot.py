"""Stage work away from the data directory: a batch of namespaces' rows as Arrow tables out, a scratch
store built from them on any machine, and the rows, deletions and index files a stage changed there,
committed back.

The flow's process reads a `Snapshot` of a batch of namespaces (their rows of every table a stage
reads, one query per table, and the policy file) and hands it to a worker through Ray's object
store. The worker builds one scratch store from it in a temporary folder of its own (never the data
directory), runs the stage there unchanged, namespace by namespace, and returns `Changes`: per table
the rows that are new or different and the keys that are gone, plus the index files the stage
wrote, for the namespaces that succeeded. The flow's process commits the changes of one or more
batches in one transaction (`apply`), one delete and one insert per table: the only writer of the
data directory is the flow's process. A row's access count and last access are the store's at
commit time (queries may have been merged since the snapshot; no stage changes them).
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
    namespaces: list[str]
    tables: dict[str, pa.Table]
    files: dict[str, bytes] = field(default_factory=dict)  # path relative to the data directory -> bytes


@dataclass
class Changes:
    namespaces: list[str]
    upserts: dict[str, pa.Table] = field(default_factory=dict)
    deletes: dict[str, pa.Table] = field(default_factory=dict)  # namespace + primary key of removed rows
    files: dict[str, bytes] = field(default_factory=dict)  # new index files, relative to the data dir

    @property
    def rows(self) -> int:
        return sum(t.num_rows for t in self.upserts.values()) + sum(t.num_rows for t in self.deletes.values())


def _names(namespaces: str | Sequence[str]) -> list[str]:
    names = [namespaces] if isinstance(namespaces, str) else list(namespaces)
    return [validate_namespace(ns) for ns in names]


def read(store: MemoryStore, namespaces: str | Sequence[str]) -> Snapshot:
    """The namespaces' rows of every table a stage reads (one query per table), and the files it
    reads (flow side)."""
    names = _names(namespaces)
    where = "namespace IN (SELECT unnest(?))"
    with store.hold():
        tables = {t: store.query(f"SELECT * FROM {t} WHERE {where}", [names]) for t in TABLES}
    files = {f: (store.home / f).read_bytes() for f in FILES if (store.home / f).exists()}
    return Snapshot(names, tables, files)


@contextlib.contextmanager
def scratch(snapshot: Snapshot) -> Iterator[MemoryStore]:
    """A store in a temporary folder holding the snapshot, kept open (worker side); removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="memstage-scratch-"))
    try:
        store = MemoryStore(folder)
        with store.hold():  # one connection for the whole batch: opening DuckDB costs tens of ms
            with store.writer() as w:
                for table, rows in snapshot.tables.items():
                    w.insert(table, rows)
            for rel, data in snapshot.files.items():
                (folder / rel).write_bytes(data)
            yield store
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def diff(store: MemoryStore, snapshot: Snapshot, namespaces: Sequence[str] | None = None) -> Changes:
    """What stages changed in the scratch `store` against `snapshot` (worker side), for `namespaces`
    (default: all of the snapshot's; leave out those whose stage failed): one query per table."""
    names = _names(snapshot.namespaces if namespaces is None else namespaces)
    out = Changes(names)
    if not names:
        return out
    where = "namespace IN (SELECT unnest(?))"
    with store.hold(), store.writer() as w:  # a writer: the registered tables live on its connection
        for table in TABLES:
            keys = ", ".join(("namespace", *(k for k in schema.PRIMARY_KEYS[table] if k != "namespace")))
            w.conn.register("_before", conform(snapshot.tables[table], schema.TABLES[table]))
            try:
                up = w.query(
                    f"SELECT * FROM {table} WHERE {where} EXCEPT SELECT * FROM _before WHERE {where}",
                    [names, names],
                )
                gone = w.query(
                    f"SELECT {keys} FROM _before WHERE {where} EXCEPT SELECT {keys} FROM {table} WHERE {where}",
                    [names, names],
                )
            finally:
                w.conn.unregister("_before")
            if up.num_rows:
                out.upserts[table] = up
            if gone.num_rows:
                out.deletes[table] = gone
    for ns in names:
        index_dir = store.home / "indexes" / ns
        if index_dir.exists():
            for path in sorted(p for p in index_dir.rglob("*") if p.is_file()):
                out.files[str(path.relative_to(store.home))] = path.read_bytes()
    return out


def apply(store: MemoryStore, batch: Sequence[Changes]) -> int:
    """Commit the changes of several batches in one transaction, one delete and one insert per table
    (flow side); index files are written first (new version folders: nothing current is
    overwritten), stale ones removed after."""
    indexes = (store.home / "indexes").resolve()
    for changes in batch:
        names = set(changes.namespaces)
        for rel, data in changes.files.items():
            path = (store.home / rel).resolve()
            if path.parent == indexes or not path.is_relative_to(indexes):
                raise ValueError(f"index file outside its namespace's folder: {rel!r}")
            if path.relative_to(indexes).parts[0] not in names:
                raise ValueError(f"index file of a namespace not in its batch: {rel!r}")
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    written = 0
    with store.writer() as w:
        for table in TABLES:
            gone = [c.deletes[table] for c in batch if table in c.deletes]
            if gone:
                written += _delete(w, table, pa.concat_tables(gone))
        for table in TABLES:
            up = [c.upserts[table] for c in batch if table in c.upserts]
            if up:
                rows = pa.concat_tables(up)
                if table == "memories":
                    rows = _with_stored_access(w, rows)
                w.insert(table, rows, replace=True)
                written += rows.num_rows
    reindexed = sorted({ns for c in batch if "index_manifest" in c.upserts
                        for ns in c.upserts["index_manifest"].column("namespace").to_pylist()})  # fmt: skip
    if reindexed:
        _remove_stale_files(store, reindexed)
    return written


def _remove_stale_files(store: MemoryStore, namespaces: list[str]) -> None:
    from memstage.stores.artifacts import remove_stale

    current = store.query(
        "SELECT namespace, path FROM index_manifest WHERE current AND namespace IN (SELECT unnest(?))",
        [namespaces],
    ).to_pylist()
    keep: dict[str, set[Path]] = {ns: set() for ns in namespaces}
    for row in current:
        keep[row["namespace"]].add(store.home / row["path"])
    for ns in namespaces:
        remove_stale(store.index_dir(ns), keep[ns])


def _delete(w: Writer, table: str, keys: pa.Table) -> int:
    cols = ("namespace", *(k for k in schema.PRIMARY_KEYS[table] if k != "namespace"))
    w.conn.register("_gone", keys.select(list(cols)))
    try:
        match = " AND ".join(f"{table}.{c} = _gone.{c}" for c in cols)
        w.execute(f"DELETE FROM {table} WHERE EXISTS (SELECT 1 FROM _gone WHERE {match})").fetchall()
    finally:
        w.conn.unregister("_gone")
    return keys.num_rows


def _with_stored_access(w: Writer, rows: pa.Table) -> pa.Table:
    """`rows` with the access count and last access the store holds now, where it holds the row."""
    rows = conform(rows, schema.TABLES["memories"])
    w.conn.register("_up", rows)
    try:
        kept = ", ".join(f"CASE WHEN m.id IS NULL THEN u.{c} ELSE m.{c} END AS {c}" for c in _KEPT)
        out = w.query(
            f"SELECT u.* REPLACE ({kept}) FROM _up u "
            "LEFT JOIN memories m ON m.id = u.id AND m.namespace = u.namespace"
        )
    finally:
        w.conn.unregister("_up")
    return conform(out, schema.TABLES["memories"])
