"""The batched fan-out (flows/fanout.py) in-process: namespaces in batches, a failing namespace retried
alone and reported, the others' changes committed once, in one transaction per batch."""

from __future__ import annotations

from collections import Counter

from stage_data import ALICE, load

from memstage.flows.fanout import batch_size, fan_out
from memstage.runtime.backends import RuntimeConfig, prefect_settings
from memstage.stores.store import MemoryStore
from memstage.tasks import registry
from memstage.tasks.registry import Stage

NAMES = ["a", "b", "c", "d", "e"]


def test_batch_size_spreads_namespaces_over_the_slots_and_caps_each_batch():
    assert batch_size(5, 2) == 1
    assert batch_size(800, 2) == 64  # 100 per batch would be fewer batches; capped
    assert batch_size(10_000, 8) == 64
    assert batch_size(200, 8) == 7  # 29 batches: at least four per slot


def test_fan_out_retries_a_failing_namespace_alone_and_reports_one_that_fails_twice(
    tmp_path, monkeypatch, token_counter
):
    from prefect import flow

    home = tmp_path / "home"
    store = MemoryStore(home)
    for ns in NAMES:
        load(store, ns, ALICE[:6], token_counter.count_many)
    calls: Counter[str] = Counter()
    d_rows = "SELECT id, text, tokens FROM memories WHERE namespace = 'd' ORDER BY id"
    before = store.query(d_rows).to_pylist()

    def flaky(scratch, namespace, tools):
        calls[namespace] += 1
        result = registry.get_stage("compress").run(scratch, namespace, tools)
        if namespace == "b" and calls[namespace] == 1:
            raise RuntimeError("transient")  # after its scratch commit: those rows must not land
        if namespace == "d":
            raise RuntimeError("always")
        return result

    monkeypatch.setitem(registry.BY_NAME, "flaky", Stage("flaky", "test stage", flaky))
    config = RuntimeConfig(home=home, runner="local")

    @flow
    def run_it():
        return fan_out("flaky", NAMES, config, False, MemoryStore(home), batch=2)

    with prefect_settings(config):
        done = run_it()
    assert dict(calls) == {"a": 1, "b": 2, "c": 1, "d": 2, "e": 1}  # the others ran once
    assert set(done.failed) == {"d"} and "always" in done.failed["d"]
    assert [r.namespace for r in done.results] == ["a", "b", "c", "e"]
    assert done.batches == 3 + 2 and done.retried == ["b", "d"]
    assert done.turns == 5 * 6
    ops = store.query("SELECT namespace, count(*) AS n FROM ops WHERE stage = 'compress' GROUP BY ALL")
    per_ns = dict(zip(ops.column("namespace").to_pylist(), ops.column("n").to_pylist(), strict=True))
    assert set(per_ns) == {"a", "b", "c", "e"}  # d's changes never landed
    assert per_ns["b"] == per_ns["a"]  # b's first, failed attempt left nothing: its ops once
    assert store.query(d_rows).to_pylist() == before  # nor its rows
