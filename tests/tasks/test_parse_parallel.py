"""A big LoCoMo file read on the worker pool (tasks.ingest.parse_parallel, a block of samples per
process) gives the tables a serial read gives: the same events in the same order, a turn repeated
across blocks kept once, bad samples and turns quarantined with the same record numbers."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from memstage.tasks import ingest, workers
from memstage.tasks.readers import read_locomo

AT = datetime(2026, 11, 29, 17, 0, 0, tzinfo=UTC)


def test_parallel_locomo_parse_equals_serial(tmp_path, locomo_path, monkeypatch):
    samples = json.loads(locomo_path.read_text())
    broken = {"sample_id": "broken", "conversation": {"session_1": "not a list", "session_2": [7, {"x": 1}]}}
    # a repeated sample (same namespace, same turns) lands in another block than its first copy
    data = [
        *samples,
        {"sample_id": "nothing"},
        broken,
        *[{**s, "sample_id": f"{s['sample_id']}-b"} for s in samples],
        samples[0],
    ]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(ingest, "now_utc", lambda: AT)
    serial = ingest.normalise(read_locomo(path, "p"), source=str(path), default_namespace=None, at=AT)
    monkeypatch.setenv("MEMSTAGE_SCAN_WORKERS", "3")
    parallel = ingest.parse_parallel(path, "p", None)
    assert workers.pool_size() == 3
    assert parallel[0].equals(serial[0]) and parallel[0].num_rows > 5000
    assert parallel[1].equals(serial[1]) and parallel[1].num_rows == 4
    assert len(set(parallel[0].column("id").to_pylist())) == parallel[0].num_rows
