"""The indexing lock: one embedding run (ingest's or the index stage's) per data directory at a time.

Two ingests started side by side used to plan the same missing embeddings, both embed them and both
write `ops` rows for them (4,500 `index/insert` rows for 3,000 memories). This file lock
(HOME/.indexing.lock, across processes and threads: flock locks belong to open files) makes the
second wait, then find nothing left to embed. Take it before `MemoryStore.hold()` (the writer lock),
never inside one, so the two locks are always taken in one order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from memstage.stores.store import StoreLockedError
from memstage.stores.writer_lock import acquire_file_lock, release_file_lock

INDEXING_LOCK_FILE = ".indexing.lock"


@contextlib.contextmanager
def indexing_lock(home: Path, wait_s: float = 6 * 3600.0) -> Iterator[None]:
    """Hold HOME's indexing lock for the block, waiting up to `wait_s` for another run to finish."""
    busy = f"another ingest or index run of {home} has not finished in {wait_s:.0f} s"
    fd = acquire_file_lock(Path(home) / INDEXING_LOCK_FILE, wait_s, StoreLockedError, busy)
    try:
        yield
    finally:
        release_file_lock(fd)
