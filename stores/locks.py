"""The indexing lock: one embedding run (ingest's or the index stage's) per data directory at a time.

Two ingests started side by side used to plan the same missing embeddings, both embed them and both
write `ops` rows for them (4,500 `index/insert` rows for 3,000 memories). This file lock
(HOME/.indexing.lock, across processes and threads: flock locks belong to open files) makes the
second wait, then find nothing left to embed. Take it before `MemoryStore.hold()` (the writer lock),
never inside one, so the two locks are always taken in one order.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from memstage.stores.store import StoreLockedError

INDEXING_LOCK_FILE = ".indexing.lock"


@contextlib.contextmanager
def indexing_lock(home: Path, wait_s: float = 6 * 3600.0) -> Iterator[None]:
    """Hold HOME's indexing lock for the block, waiting up to `wait_s` for another run to finish."""
    fd = os.open(Path(home) / INDEXING_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreLockedError(
                        f"another ingest or index run of {home} has not finished in {wait_s:.0f} s"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
