"""What crosses into the worker pool: a table sent there carries its own rows' bytes, not its parent's."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa

from memstage.tasks import workers


def _rows(n: int) -> pa.Table:
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(n * 384, dtype=np.float32)), 384)
    return pa.table({"id": [f"m{i}" for i in range(n)], "embedding": vectors})


def test_owned_slice_pickles_its_rows_only():
    parent = _rows(20_000)
    part = parent.slice(7_000, 500)
    assert len(pickle.dumps(part)) > len(pickle.dumps(parent)) // 2  # the reason for owned()
    shipped = workers.owned(part)
    assert len(pickle.dumps(shipped)) < len(pickle.dumps(parent)) * 500 / 20_000 * 1.5
    assert shipped.equals(part)
    assert workers.owned(parent.slice(0, 0)).num_rows == 0
