"""The one writer rule of a data directory: who may write `memstage.duckdb`, and who waits.

One mechanism, in two layers of the same lock:
- Between processes (and machines that share the folder), an exclusive `flock` on HOME/memstage.lock,
  held for one write transaction or one `MemoryStore.hold()`. DuckDB itself refuses a second
  read-write open of the file; the lock turns that into an orderly wait with a clear message naming
  the holder (pid and since when), and lets readers retry instead of failing.
- Inside a process, threads queue at a gate in front of the flock (`flock` conflicts between two open
  files of one process too, so a second thread would otherwise fail at once as if another process
  held the store). Threads that share one held connection take turns per transaction at its
  `write_mutex`.

What it protects: the atomicity of a stage's commit (rows and their ops in one transaction) and the
file against two writers. What it does not do: order work across a cluster. Deployment runs that
write also take a Prefect global concurrency slot per store (`flows/deployments.py`), so they queue
in Prefect's UI instead of waiting here; on a cluster only the flow's own process commits (workers
return Arrow), so the data directory need not be shared at all.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb


class StoreLockedError(Exception):
    """Another process holds the writer lock (re-exported by stores.store as a StoreError)."""


@dataclass
class HeldDatabase:
    """This process's open read-write connection to one store file, while some `hold()` is active."""

    conn: duckdb.DuckDBPyConnection
    lock_fd: int
    depth: int = 1
    write_mutex: threading.RLock = field(default_factory=threading.RLock)  # one transaction at a time


# Per process, keyed by database path: the held connections, and the gate threads queue at.
held: dict[Path, HeldDatabase] = {}
held_mutex = threading.Lock()
_gates: dict[Path, threading.Lock] = {}


def gate(db_path: Path) -> threading.Lock:
    """This process's gate in front of one store file's flock."""
    with held_mutex:
        return _gates.setdefault(db_path, threading.Lock())


def acquire_file_lock(
    lock_path: Path, timeout_s: float, error: type[Exception], busy: str | None = None
) -> int:
    """Take the exclusive flock (waiting up to `timeout_s`); returns its fd, with the holder written in.
    `busy`: the error's message when the wait runs out (default: the writer's, naming the holder)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown process"
                os.close(fd)
                raise error(
                    busy
                    or f"another writer holds {lock_path} ({holder}); wait for it to finish, "
                    f"or point --home / MEMSTAGE_HOME at another data directory"
                ) from None
            time.sleep(0.1)
    os.ftruncate(fd, 0)
    since = datetime.now(UTC).isoformat(timespec="seconds")
    os.pwrite(fd, f"pid {os.getpid()} since {since}".encode(), 0)
    return fd


def release_file_lock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
