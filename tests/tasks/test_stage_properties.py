"""Properties of the stages over random sequences of ingest / stage runs / forget (hypothesis).

After every step: a stage run again at once changes nothing (idempotency); no memory or event is lost
except by forget; the other namespace's rows are untouched (isolation); and after a hard forget of a
subject no table and no file under the data directory contains its text (byte search).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stage_data import load, table_contents

from memstage.stores.compact import find_bytes
from memstage.stores.store import MemoryStore
from memstage.tasks.forget import forget_hard, save_policy
from memstage.tasks.registry import STAGE_NAMES, STAGES, StageTools


def pool(ns: str, subject: str) -> list[tuple[str, str, str, str]]:
    """Eight turns of one namespace: filler, a changed fact, a duplicate, and a subject only it mentions."""
    return [
        ("s1", "Ann", f"Hey {ns}! Good to see you! How have you been?", "2023-01-02T10:00:00Z"),
        ("s1", "Ann", "I live in Lisbon and I work at Northwind Traders.", "2023-01-02T10:01:00Z"),
        (
            "s1",
            "Ben",
            f"My cousin visited {subject} yesterday and loved the old harbour.",
            "2023-01-02T10:02:00Z",
        ),
        ("s1", "Ann", "I bake sourdough bread every Sunday morning.", "2023-01-02T10:03:00Z"),
        ("s1", "Ann", "I bake sourdough bread every single Sunday morning.", "2023-01-02T10:04:00Z"),
        ("s2", "Ann", "Wow, big news: I moved to Porto last month!", "2023-04-05T09:00:00Z"),
        (
            "s2",
            "Ben",
            f"Did you know {subject} has 3 markets? I went to all of them.",
            "2023-04-05T09:01:00Z",
        ),
        ("s2", "Ann", "Thanks so much, that's really sweet!", "2023-04-05T09:02:00Z"),
    ]


SUBJECTS = {"ns-a": "Zanzibar", "ns-b": "Quokkaville"}
OPS = st.one_of(
    st.tuples(st.just("ingest"), st.sampled_from(sorted(SUBJECTS)), st.integers(1, 8)),
    st.tuples(
        st.sampled_from(STAGE_NAMES),
        st.sampled_from(sorted(SUBJECTS)),
    ),
    st.tuples(st.just("forget_hard"), st.sampled_from(sorted(SUBJECTS))),
)


def run_sequence(ops: list[tuple], encoder, token_counter) -> None:
    home = Path(tempfile.mkdtemp(prefix="memstage-prop-"))
    try:
        store = MemoryStore(home)
        for ns in SUBJECTS:
            save_policy(store, ns, {"capacity": 6, "clock": "latest_event"})
        tools = StageTools(embed=encoder.encode, count_tokens=token_counter.count_many)
        stages = {s.name: (lambda ns, s=s: s.run(store, ns, tools)) for s in STAGES}
        for op in ops:
            kind, ns = op[0], op[1]
            other = next(n for n in SUBJECTS if n != ns)
            other_before = table_contents(store, other)
            ids_before = set(
                store.query("SELECT id FROM memories WHERE namespace = ?", [ns]).column("id").to_pylist()
            )
            events_before = set(store.events(ns).column("id").to_pylist())
            if kind == "ingest":
                load(store, ns, pool(ns, SUBJECTS[ns])[: op[2]], token_counter.count_many)
            elif kind == "forget_hard":
                if not events_before:
                    continue
                forget_hard(store, ns, subject=SUBJECTS[ns], embed=encoder.encode)
                assert find_bytes(home, SUBJECTS[ns]) == [], f"{SUBJECTS[ns]} left on disk after {ops}"
                for table, col in (
                    ("events", "text"),
                    ("memories", "text"),
                    ("ops", "after"),
                    ("ops", "before"),
                ):
                    n = store.query(
                        f"SELECT count(*) AS n FROM {table} WHERE {col} ILIKE ?", [f"%{SUBJECTS[ns]}%"]
                    )
                    assert n.column("n")[0].as_py() == 0
            else:
                if not events_before:
                    continue
                stages[kind](ns)
                again = stages[kind](ns)
                assert again.changed == 0, f"{kind} not idempotent after {ops}: {again.as_dict()}"
            if kind not in ("forget_hard",):
                ids_after = set(
                    store.query("SELECT id FROM memories WHERE namespace = ?", [ns]).column("id").to_pylist()
                )
                assert ids_before <= ids_after, f"{kind} lost memories {ids_before - ids_after}"
                assert events_before <= set(store.events(ns).column("id").to_pylist())
            assert table_contents(store, other) == other_before, f"{kind} on {ns} changed {other}"
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_one_fixed_sequence(encoder, token_counter):
    ops = [
        ("ingest", "ns-a", 8),
        ("ingest", "ns-b", 5),
        ("compress", "ns-a"),
        ("consolidate", "ns-a"),
        ("update", "ns-a"),
        ("index", "ns-a"),
        ("forget", "ns-a"),
        ("forget_hard", "ns-a"),
        ("consolidate", "ns-a"),
        ("index", "ns-b"),
    ]
    run_sequence(ops, encoder, token_counter)


@pytest.mark.slow
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(OPS, min_size=2, max_size=7))
def test_random_sequences(ops, encoder, token_counter):
    run_sequence(ops, encoder, token_counter)
