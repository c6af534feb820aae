"""The memory store: one DuckDB file per data directory, Arrow in and out, one writer at a time.

Reads open short-lived read-only connections (or reuse this process's writer connection); writes go
through `MemoryStore.writer()`, which takes the data directory's writer lock (`writer_lock.py` says
what it protects and what it does on a cluster), opens the database read-write and commits
everything done inside the `with` block as one transaction. `MemoryStore.hold()` keeps one
connection (and the lock) for a run of reads and writes, since opening DuckDB costs tens of ms.
Every read and write names a namespace; `validate_namespace` keeps names safe as folder names too.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from memstage.settings import get_settings
from memstage.stores import schema, writer_lock

DB_FILE = "memstage.duckdb"
LOCK_FILE = "memstage.lock"
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StoreError(Exception):
    """A problem with the store that the user can act on; the message says what and where."""


class StoreLockedError(StoreError, writer_lock.StoreLockedError):
    """Another process holds the writer lock."""


class NamespaceError(StoreError):
    """A namespace name that is malformed or names nothing stored."""


def validate_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace):
        raise NamespaceError(
            f"invalid namespace {namespace!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return namespace


def default_home() -> Path:
    return get_settings().home


def now_utc() -> datetime:
    return datetime.now(UTC)


class Writer:
    """The open write transaction handed out by `MemoryStore.writer()`."""

    def __init__(self, conn: duckdb.DuckDBPyConnection) -> None:
        self.conn = conn

    def insert(self, table: str, rows: pa.Table, *, replace: bool = False, absent: bool = False) -> int:
        """Insert rows of `table`'s schema; existing primary keys are kept (or replaced with `replace`).
        `absent`: the caller checked that no row's key is stored (in this transaction): one plain
        INSERT, no anti-join (a stored key then fails the transaction instead of being skipped).

        Returns the number of rows that were new (not already stored by primary key)."""
        if rows.num_rows == 0:
            return 0
        rows = conform(rows, schema.TABLES[table])
        keys = schema.PRIMARY_KEYS[table]
        self.conn.register("_incoming", rows)
        try:
            cols = ", ".join(f'"{c}"' for c in rows.column_names)
            if absent:
                self.conn.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _incoming")
                return rows.num_rows
            join = " AND ".join(f"t.{k} = i.{k}" for k in keys)
            new = self.conn.execute(
                f"SELECT count(*) FROM _incoming i WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {join})"
            ).fetchone()[0]
            verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
            self.conn.execute(f"{verb} INTO {table} ({cols}) SELECT {cols} FROM _incoming")
        finally:
            self.conn.unregister("_incoming")
        return int(new)

    def existing_ids(self, table: str, ids: Sequence[str]) -> set[str]:
        """Which of `ids` are stored in `table` already (read inside this transaction)."""
        if not ids:
            return set()
        self.conn.register("_probe", pa.table({"id": pa.array(list(ids), pa.string())}))
        try:
            rows = self.conn.execute(f"SELECT id FROM {table} WHERE id IN (SELECT id FROM _probe)").fetchall()
        finally:
            self.conn.unregister("_probe")
        return {r[0] for r in rows}

    def delete(self, table: str, namespace: str, ids: Sequence[str], *, key: str = "id") -> int:
        if not ids:
            return 0
        validate_namespace(namespace)
        self.conn.register("_ids", pa.table({"id": pa.array(list(ids), pa.string())}))
        try:
            n = self.conn.execute(
                f"SELECT count(*) FROM {table} WHERE namespace = ? AND {key} IN (SELECT id FROM _ids)",
                [namespace],
            ).fetchone()[0]
            self.conn.execute(
                f"DELETE FROM {table} WHERE namespace = ? AND {key} IN (SELECT id FROM _ids)", [namespace]
            )
        finally:
            self.conn.unregister("_ids")
        return int(n)

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> duckdb.DuckDBPyConnection:
        return self.conn.execute(sql, params or [])

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        return self.conn.sql(sql, params=list(params or [])).to_arrow_table()


class MemoryStore:
    """Handle on a data directory: `memstage.duckdb`, the writer lock and the index artifacts."""

    def __init__(self, home: Path | str | None = None, *, lock_timeout_s: float = 0.0) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.home.mkdir(parents=True, exist_ok=True)
        self.db_path = self.home / DB_FILE
        self.lock_path = self.home / LOCK_FILE
        self.lock_timeout_s = lock_timeout_s
        memory = get_settings().duckdb_memory  # MEMSTAGE_DUCKDB_MEMORY: bounds DuckDB's buffers
        self._config: dict[str, str] = {"memory_limit": memory} if memory else {}
        self._conn: duckdb.DuckDBPyConnection | None = None
        self._mutex = threading.RLock()
        if not self.db_path.exists():
            with self.writer():
                pass

    def __repr__(self) -> str:
        return f"MemoryStore({str(self.home)!r})"

    # ---- writing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def hold(self) -> Iterator[MemoryStore]:
        """Keep the database open in this process for a run of reads and writes (re-entrant).

        Opening a DuckDB file costs about 30 ms (20 ms even for an in-memory one) and closing it
        after a write checkpoints it; a flow step that reads and writes a dozen times paid that a
        dozen times (a tenth of the ingest flow's time). Inside `hold()` every reader and writer of
        this process, whichever `MemoryStore` object it uses, shares one connection, and the writer
        lock is held throughout: keep it to one step, since other processes wait meanwhile (their
        readers retry for 30 s). Each `writer()` inside is still its own transaction.
        """
        with writer_lock.held_mutex:
            held = writer_lock.held.get(self.db_path)
            if held is not None:
                held.depth += 1
        if held is None:
            in_process = writer_lock.gate(self.db_path)
            in_process.acquire()  # released when the last hold ends (maybe by another thread)
            try:
                lock_fd = self._acquire_lock()
                try:
                    conn = self._connect(read_only=False)
                    self._migrate(conn)
                except BaseException:
                    writer_lock.release_file_lock(lock_fd)
                    raise
            except BaseException:
                in_process.release()
                raise
            with writer_lock.held_mutex:
                held = writer_lock.held[self.db_path] = writer_lock.HeldDatabase(conn, lock_fd)
        try:
            yield self
        finally:
            in_process = writer_lock.gate(
                self.db_path
            )  # taken before writer_lock.held_mutex: it is not re-entrant
            with writer_lock.held_mutex:
                held.depth -= 1
                if held.depth == 0:
                    del writer_lock.held[self.db_path]
                    try:
                        held.conn.close()
                    finally:
                        writer_lock.release_file_lock(held.lock_fd)
                        in_process.release()

    @contextlib.contextmanager
    def writer(self) -> Iterator[Writer]:
        """One transaction under the exclusive writer lock; rolled back if the block raises."""
        held = writer_lock.held.get(self.db_path)
        if held is not None:
            with held.write_mutex, self._mutex:
                if self._conn is not None:
                    raise StoreError("nested writer() in one process: commit the open transaction first")
                conn = held.conn.cursor()
                self._conn = conn
                try:
                    yield from self._transaction(conn)
                finally:
                    self._conn = None
                    conn.close()
            return
        # Writers in other threads of this process queue here (behind a hold, too): on the file
        # lock alone the second one would fail at once as if another process held the store.
        with self._mutex, writer_lock.gate(self.db_path):
            if self._conn is not None:
                raise StoreError("nested writer() in one process: commit the open transaction first")
            lock_fd = self._acquire_lock()
            try:
                conn = self._connect(read_only=False)
                try:
                    self._migrate(conn)
                    self._conn = conn
                    yield from self._transaction(conn)
                finally:
                    self._conn = None
                    conn.close()
            finally:
                writer_lock.release_file_lock(lock_fd)

    @staticmethod
    def _transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[Writer]:
        conn.execute("BEGIN TRANSACTION")
        try:
            yield Writer(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _connect(self, *, read_only: bool) -> duckdb.DuckDBPyConnection:
        """Open the file, waiting (up to 30 s, or the lock timeout if longer) while it is open in a way
        that excludes us: read-write by another process (IOException), or, in this process, by another
        thread in the other mode (DuckDB allows one configuration per file per process:
        ConnectionException). Either holder closes within one step; measured waits are milliseconds."""
        deadline = time.monotonic() + max(self.lock_timeout_s, 30.0)
        while True:
            try:
                return duckdb.connect(str(self.db_path), read_only=read_only, config=self._config)
            except (duckdb.IOException, duckdb.ConnectionException) as exc:
                if time.monotonic() >= deadline:
                    raise StoreLockedError(f"cannot open {self.db_path}: {exc}") from exc
                time.sleep(0.02)

    def _acquire_lock(self) -> int:
        return writer_lock.acquire_file_lock(self.lock_path, self.lock_timeout_s, StoreLockedError)

    def _migrate(self, conn: duckdb.DuckDBPyConnection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        row = conn.execute("SELECT value FROM schema_meta WHERE key = 'version'").fetchone()
        version = int(row[0]) if row else 0
        if version > schema.SCHEMA_VERSION:
            raise StoreError(
                f"{self.db_path} has schema version {version}, newer than this memstage "
                f"({schema.SCHEMA_VERSION}); upgrade memstage"
            )
        if version == schema.SCHEMA_VERSION:
            return
        conn.execute("BEGIN TRANSACTION")
        if version == 0:
            for name in schema.TABLES:
                conn.execute(schema.create_table_sql(name))
            version = 1
        for target, statements in schema.MIGRATIONS:
            if target > version:
                for sql in statements:
                    conn.execute(sql)
                version = target
        conn.execute("INSERT OR REPLACE INTO schema_meta VALUES ('version', ?)", [str(schema.SCHEMA_VERSION)])
        conn.execute("COMMIT")

    # ---- reading -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._mutex:
            if self._conn is not None:  # this process is writing: read inside its transaction
                yield self._conn.cursor()
                return
        held = writer_lock.held.get(self.db_path)
        if held is not None:
            cursor = held.conn.cursor()
            try:
                yield cursor
            finally:
                cursor.close()
            return
        conn = self._connect(read_only=True)
        try:
            yield conn
        finally:
            conn.close()

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        """Run a read-only SQL query; callers put `namespace = ?` in it."""
        with self._reader() as conn:
            return conn.sql(sql, params=list(params or [])).to_arrow_table()

    def namespaces(self) -> list[str]:
        t = self.query(
            "SELECT DISTINCT namespace FROM events UNION SELECT DISTINCT namespace FROM memories ORDER BY 1"
        )
        return sorted(t.column("namespace").to_pylist())

    def require_namespace(self, namespace: str) -> str:
        validate_namespace(namespace)
        n = self.query("SELECT count(*) AS n FROM memories WHERE namespace = ?", [namespace])
        if n.column("n")[0].as_py() == 0:
            known = self.namespaces()
            hint = (
                f"; known: {', '.join(known[:20])}"
                if known
                else "; the store is empty (run `memstage ingest`)"
            )
            raise NamespaceError(f"namespace {namespace!r} has no memories in {self.home}{hint}")
        return namespace

    def events(self, namespace: str, ids: Sequence[str] | None = None) -> pa.Table:
        validate_namespace(namespace)
        if ids is None:
            return self.query("SELECT * FROM events WHERE namespace = ? ORDER BY session, seq", [namespace])
        return self.query(
            "SELECT * FROM events WHERE namespace = ? AND id IN (SELECT unnest(?)) ORDER BY session, seq",
            [namespace, list(ids)],
        )

    def memories(
        self, namespace: str, *, level: int | None = None, status: str | None = "active", current: bool = True
    ) -> pa.Table:
        """Memories of a namespace; by default the active, currently valid ones."""
        validate_namespace(namespace)
        where, params = ["namespace = ?"], [namespace]
        if level is not None:
            where.append("level = ?")
            params.append(level)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if current:
            where.append("valid_to IS NULL")
        return self.query(
            f"SELECT * FROM memories WHERE {' AND '.join(where)} ORDER BY level, session, event_time, id",
            params,
        )

    def counts(self, namespace: str | None = None) -> dict[str, Any]:
        """Rows per table, and memories per level, for one namespace or all."""
        ns_where, params = ("WHERE namespace = ?", [namespace]) if namespace else ("", [])
        out: dict[str, Any] = {}
        for table in schema.TABLES:
            out[table] = (
                self.query(f"SELECT count(*) AS n FROM {table} {ns_where}", params).column("n")[0].as_py()
            )
        levels = self.query(
            f"SELECT level, status, count(*) AS n FROM memories {ns_where} GROUP BY ALL ORDER BY ALL", params
        ).to_pylist()
        out["memories_by_level"] = {f"L{r['level']}/{r['status']}": r["n"] for r in levels}
        out["flagged"] = (
            self.query(
                f"SELECT count(*) AS n FROM memories {ns_where} {'AND' if ns_where else 'WHERE'} "
                "coalesce(flag, '') <> '' AND status = 'active' AND valid_to IS NULL",
                params,
            )
            .column("n")[0]
            .as_py()
        )
        return out

    # ---- index artifacts ---------------------------------------------------------------------

    def index_dir(self, namespace: str) -> Path:
        path = self.home / "indexes" / validate_namespace(namespace)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def current_indexes(self, namespace: str) -> pa.Table:
        validate_namespace(namespace)
        return self.query(
            "SELECT * FROM index_manifest WHERE namespace = ? AND current ORDER BY level, kind", [namespace]
        )

    def models_dir(self) -> Path:
        """Converted model files: under the data directory, or MEMSTAGE_MODELS to share one copy between several."""
        return models_dir(self.home)

    def remove_namespace_files(self, namespace: str) -> None:
        shutil.rmtree(self.home / "indexes" / validate_namespace(namespace), ignore_errors=True)


def models_dir(home: Path | str) -> Path:
    """MEMSTAGE_MODELS, else HOME/models (made if missing)."""
    override = get_settings().models
    path = override if override else Path(home).expanduser() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def conform(rows: pa.Table, target: pa.Schema) -> pa.Table:
    """Reorder/cast `rows` to `target`; missing nullable columns become nulls, extra columns are an error."""
    extra = set(rows.column_names) - set(target.names)
    if extra:
        raise StoreError(f"columns not in the schema: {sorted(extra)}")
    cols = []
    for field in target:
        if field.name in rows.column_names:
            cols.append(rows.column(field.name).cast(field.type))
        else:
            cols.append(pa.nulls(rows.num_rows, field.type))
    return pa.Table.from_arrays(cols, schema=target)


def to_json(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True, ensure_ascii=False)
