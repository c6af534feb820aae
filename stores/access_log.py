"""Query records without the writer per query: a journal of each query's `runs` row and used memories,
merged into the store in batches, exactly once.

A query appends one JSON line (its `runs` row, its namespace, the ids of the memories it used and
when) to this process's journal, HOME/accesses/<host>-<pid>-<token>.jsonl: an O_APPEND write, no
lock file, no DuckDB connection. `flush()` merges journals into the store in one writer transaction:
the `runs` rows that are not stored yet (by their primary key, `run_id`) go in, and only the accesses
of those runs bump `access_count` / `last_access`. A journal is deleted after its commit, so a crash
between the commit and the delete merges nothing twice; a flush that meets a busy store keeps the
journal for the next one, so no count is lost. What gets merged: this process's own journals
(rotated first, so no line is appended to a file being merged) and those of dead processes of this
host (a cold `memstage query` that found the store busy). A journal line is a durable record once the
write returns (a crash of the process keeps it; a power loss may not: no fsync per query).

`AccessFlusher` is the background thread `memstage serve` runs: a flush every `interval_s`, one at
shutdown. Without a flusher in the process (the CLI's cold query, the query deployment), the query
flushes its own journal at once, and a busy store leaves it to the next flush (maintenance runs one
before its stages: `flows/stages.py`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from memstage.stores.schema import RUNS
from memstage.stores.store import MemoryStore, StoreLockedError, validate_namespace

log = logging.getLogger("memstage")

FOLDER = "accesses"
_HOST = socket.gethostname().replace("-", "_")[:64] or "host"


class AccessJournal:
    """This process's journal of one data directory (thread-safe; one per home, `journal(home)`)."""

    def __init__(self, home: Path) -> None:
        self.folder = Path(home) / FOLDER
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self.flusher: AccessFlusher | None = None

    def append(self, namespace: str, memory_ids: Sequence[str], run: dict[str, Any]) -> None:
        line = {
            "namespace": validate_namespace(namespace),
            "ids": [str(i) for i in memory_ids],
            "run": {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in run.items()},
        }
        data = (json.dumps(line, ensure_ascii=False, default=str) + "\n").encode()
        with self._lock:
            if self._fd is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._path = self.folder / f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
                self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.write(self._fd, data)  # one write per line: threads never interleave inside a line

    def rotate(self) -> None:
        """Close the open journal: later appends start a new file, so this one can be merged."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd, self._path = None, None

    def mergeable(self) -> list[Path]:
        """Closed journals of this process and every journal of a dead process of this host."""
        if not self.folder.exists():
            return []
        with self._lock:
            open_path = self._path
        found = []
        for path in sorted(self.folder.glob("*.jsonl")):
            if path == open_path:
                continue
            host, _, rest = path.name.partition("-")
            pid = rest.split("-", 1)[0]
            if host != _HOST or not pid.isdigit():
                continue  # another machine's journal: its own process merges it
            if int(pid) == os.getpid() or not _alive(int(pid)):
                found.append(path)
        return found

    def flush(self, store: MemoryStore) -> int:
        """Merge every mergeable journal into `store` (one transaction); returns the runs merged.
        Raises StoreLockedError when the store stays busy past its lock timeout: journals are kept."""
        self.rotate()
        paths = self.mergeable()
        if not paths:
            return 0
        runs, accesses = read_journals(paths)
        merged = merge(store, runs, accesses)
        for path in paths:
            path.unlink(missing_ok=True)
        return merged

    def pending(self) -> int:
        """Journal lines not merged yet (this process's and others')."""
        if not self.folder.exists():
            return 0
        return sum(sum(1 for _ in p.open("rb")) for p in self.folder.glob("*.jsonl"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_journals(paths: Sequence[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Runs rows and (run_id, namespace, id, at) accesses from journal files; a malformed line (a torn
    write at a crash, or anything hostile) is skipped and logged, never merged."""
    runs: dict[str, dict[str, Any]] = {}
    accesses: list[dict[str, Any]] = []
    for path in paths:
        for n, raw in enumerate(path.read_bytes().splitlines(), 1):
            try:
                line = json.loads(raw)
                run = line["run"]
                ns = validate_namespace(line["namespace"])
                if run.get("namespace") != ns or not isinstance(run.get("run_id"), str):
                    raise ValueError("run row and namespace disagree")
                at = datetime.fromisoformat(run["started_at"])
                ids = [str(i) for i in line["ids"]]
            except Exception as exc:  # noqa: BLE001 - a bad line must not block the good ones
                log.warning("access journal %s line %d skipped: %s", path.name, n, exc)
                continue
            runs[run["run_id"]] = {**run, "started_at": at}
            accesses += [{"run_id": run["run_id"], "namespace": ns, "id": i, "ts": at} for i in ids]
    return list(runs.values()), accesses


_ACCESS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("namespace", pa.string()),
        ("id", pa.string()),
        ("ts", RUNS.field("started_at").type),
    ]
)


def merge(store: MemoryStore, runs: list[dict[str, Any]], accesses: list[dict[str, Any]]) -> int:
    """One transaction: the runs not stored yet, and the access counts of those runs only."""
    if not runs:
        return 0
    runs_t = pa.Table.from_pylist(runs, schema=RUNS)
    acc_t = pa.Table.from_pylist(accesses, schema=_ACCESS_SCHEMA)
    with store.writer() as w:
        w.conn.register("_jruns", runs_t)
        w.conn.register("_jacc", acc_t)
        try:
            w.execute(
                "CREATE TEMP TABLE _new AS SELECT run_id FROM _jruns j "
                "WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.run_id = j.run_id)"
            ).fetchall()
            w.execute(
                """UPDATE memories SET access_count = coalesce(access_count, 0) + a.n,
                          last_access = greatest(coalesce(last_access, a.ts), a.ts)
                   FROM (SELECT namespace, id, count(*)::INTEGER AS n, max(ts) AS ts FROM _jacc
                         WHERE run_id IN (SELECT run_id FROM _new) GROUP BY namespace, id) a
                   WHERE memories.namespace = a.namespace AND memories.id = a.id"""
            ).fetchall()
            merged = w.execute("SELECT count(*) FROM _new").fetchall()[0][0]
            w.insert("runs", runs_t)  # INSERT OR IGNORE by run_id: a run merged before stays as it was
            w.execute("DROP TABLE _new").fetchall()
        finally:
            with contextlib.suppress(duckdb.Error):  # after a failed statement the transaction is aborted
                w.conn.unregister("_jruns")
                w.conn.unregister("_jacc")
    return int(merged)


_journals: dict[Path, AccessJournal] = {}
_journals_lock = threading.Lock()


def journal(home: Path | str) -> AccessJournal:
    """This process's journal of `home`."""
    key = Path(home).expanduser().resolve()
    with _journals_lock:
        return _journals.setdefault(key, AccessJournal(key))


def flush_now(home: Path | str, *, lock_timeout_s: float = 0.0) -> int | None:
    """Merge what can be merged now; None (journals kept) when the store is busy."""
    try:
        return journal(home).flush(MemoryStore(home, lock_timeout_s=lock_timeout_s))
    except StoreLockedError:
        return None


class AccessFlusher:
    """A daemon thread merging `home`'s journals every `interval_s`; `stop()` flushes a last time."""

    def __init__(self, home: Path | str, interval_s: float = 1.0, final_wait_s: float = 30.0) -> None:
        self.journal = journal(home)
        self.home = Path(home)
        self.interval_s = interval_s
        self.final_wait_s = final_wait_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memstage-access-flush", daemon=True)

    def start(self) -> AccessFlusher:
        self.journal.flusher = self
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                flush_now(self.home)
            except Exception:  # noqa: BLE001 - the thread must outlive one bad flush; journals are kept
                log.exception("merging query records failed; kept for the next flush")

    def stop(self) -> int | None:
        self._stop.set()
        self._thread.join()
        self.journal.flusher = None
        return flush_now(self.home, lock_timeout_s=self.final_wait_s)
