"""The encoder pool: chunking, the broker's channels, every chunk back exactly once, and a failing
encoder that fails the flow (instead of hanging it) with what was embedded kept for a rerun."""

from __future__ import annotations

import pickle
import threading
import time
from multiprocessing.connection import AuthenticationError, Client
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE
from prefect import flow

from memstage.runtime.backends import RuntimeConfig, prefect_settings, task_runner
from memstage.runtime.chunk_broker import REMOTE_METHODS, BrokerChannel, BrokerServer, ChunkBroker
from memstage.runtime.encoder_pool import chunked, start_encoders


def test_chunks_keep_ids_with_texts_longest_first():
    texts = ["a" * n for n in (3, 9, 1, 7, 5)]
    ids = [f"id{len(t)}" for t in texts]
    chunks = chunked(ids, texts, 2)
    assert [len(c[0]) for c in chunks] == [2, 2, 1]
    flat = [(i, t) for c_ids, c_texts in chunks for i, t in zip(c_ids, c_texts, strict=True)]
    assert [len(t) for _, t in flat] == [9, 7, 5, 3, 1]
    assert all(i == f"id{len(t)}" for i, t in flat)


def test_broker_channels_are_separate_and_close_wakes_waiting_encoders():
    broker = ChunkBroker()
    broker.open("a")
    broker.open("b")
    broker.put_work("a", [1, 2])
    assert broker.get_work("b", timeout=0.01) == "wait"
    assert broker.get_work("a") == 1
    assert broker.exchange("a", "r1") == 2
    assert broker.take_results("a", timeout=0) == ["r1"]
    assert broker.take_results("b", timeout=0) == []

    got = []
    waiter = threading.Thread(target=lambda: got.append(broker.get_work("b", timeout=30)))
    waiter.start()
    broker.close("b")
    waiter.join(timeout=5)
    assert got == [None]  # woken at once, told to stop
    assert broker.get_work("b") is None
    with pytest.raises(RuntimeError, match="closed"):
        broker.put_work("b", [3])


def test_take_results_gathers_up_to_min_items_within_the_timeout():
    broker = ChunkBroker()
    broker.open("a")
    broker.put_result("a", "r1")
    started = time.monotonic()
    assert broker.take_results("a", timeout=0.3, min_items=2) == ["r1"]  # only one came: waited it out
    assert time.monotonic() - started >= 0.25
    threading.Timer(0.05, broker.put_result, ("a", "r3")).start()
    broker.put_result("a", "r2")
    started = time.monotonic()
    assert broker.take_results("a", timeout=10, min_items=2) == ["r2", "r3"]  # back once both came
    assert time.monotonic() - started < 5


def test_encoders_reach_the_flows_broker_through_its_socket_and_strangers_do_not():
    broker = ChunkBroker()
    server = BrokerServer(broker)
    flow_side = BrokerChannel("c", local=broker, address=server.address, authkey=server.authkey)
    flow_side.call("open")
    flow_side.call("put_work", [("chunk-1", ["id"], ["text"])])
    # What an encoder task receives: the address and key, never the queues.
    encoder_side = pickle.loads(pickle.dumps(flow_side))
    assert encoder_side.local is None and encoder_side.address == server.address
    assert encoder_side.call("get_work") == ("chunk-1", ["id"], ["text"])
    assert encoder_side.call("exchange", "result-1", 0.05) == "wait"
    assert flow_side.call("take_results", 1.0) == ["result-1"]
    with pytest.raises(RuntimeError, match="may not be called remotely"):
        encoder_side.call("put_work", ["forged"])  # an encoder cannot add work
    assert "put_work" not in REMOTE_METHODS
    with pytest.raises(AuthenticationError):
        Client(server.address, authkey=b"not the key")
    flow_side.call("close")
    got = []  # a new thread opens a new connection: the server still accepts after the stranger
    reader = threading.Thread(target=lambda: got.append(encoder_side.call("get_work")))
    reader.start()
    reader.join(timeout=10)
    assert got == [None]  # the channel is closed: stop
    with pytest.raises(TypeError, match="cannot leave"):
        pickle.dumps(BrokerChannel("d", local=broker))


@pytest.mark.parametrize("pretokenise", [False, True])
def test_every_chunk_comes_back_once_with_its_namespace(tmp_path, encoder, monkeypatch, pretokenise):
    """Also with the chunks tokenised on the flow's worker pool and sent as token ids (what a GPU host
    does; here the same path on CPU, with the local encoder)."""
    monkeypatch.setenv("MEMSTAGE_SCAN_WORKERS", "2")
    config = RuntimeConfig(home=tmp_path / "home", runner="local")
    texts = {
        "ns-a": [f"Alice said thing number {i}" * (1 + i % 3) for i in range(300)],
        "ns-b": ["short"] * 5,
    }

    @flow(name="pool-test")
    def run() -> dict[str, dict[str, np.ndarray]]:
        back: dict[str, dict[str, np.ndarray]] = {"ns-a": {}, "ns-b": {}}
        with start_encoders(config, use_ray=False) as pool:
            assert not pool.pretokenise  # only a GPU encoder gets token ids by default
            pool.pretokenise = pretokenise
            # chunks filled across namespaces: one chunk holds the end of ns-a and all of ns-b
            pool.submit_many([(ns, [f"{ns}/{i}" for i in range(len(ts))], ts) for ns, ts in texts.items()])
            assert any(len(segments) == 2 for segments in pool.outstanding.values())
            assert pool.outstanding_rows() == 305
            while pool.outstanding:
                for ns, table in pool.collect(timeout=0.5):
                    for memory_id, vec in zip(
                        table["id"].to_pylist(), table["embedding"].to_pylist(), strict=True
                    ):
                        assert memory_id not in back[ns]
                        back[ns][memory_id] = np.asarray(vec, dtype=np.float32)
            assert pool.stop() == sum(map(len, texts.values()))
            assert [r["texts"] for r in pool.reports] == [305]  # one encoder's report (runtime/phases.py)
        return back

    with prefect_settings(config):
        back = run.with_options(task_runner=task_runner(config, batch=True))()
    for ns, ts in texts.items():
        assert sorted(back[ns]) == sorted(f"{ns}/{i}" for i in range(len(ts)))
    expected = encoder.encode([texts["ns-a"][7], texts["ns-b"][0]])
    assert float(back["ns-a"]["ns-a/7"] @ expected[0]) > 0.999
    assert all(float(v @ expected[1]) > 0.999 for v in back["ns-b"].values())


def test_a_failing_encoder_fails_the_ingest_and_a_rerun_makes_the_rest(tmp_path, monkeypatch):
    from memstage.flows.ingest import run_ingest
    from memstage.runtime import encoder_pool
    from memstage.runtime.services import MemoryServices
    from memstage.stores.store import MemoryStore

    config = RuntimeConfig(home=tmp_path / "home", runner="local")
    monkeypatch.setattr(encoder_pool, "ALIVE_CHECK_S", 0.2)

    def broken(self, texts):
        raise RuntimeError("encoder out of memory (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(MemoryServices, "encode", broken)
        with pytest.raises(RuntimeError, match="out of memory"):
            run_ingest(SAMPLE, "jsonl", None, config, show_progress=False)
    store = MemoryStore(config.home)
    events = store.query("SELECT count(*) AS n FROM events").column("n")[0].as_py()
    memories = store.query("SELECT count(*) AS n FROM memories").column("n")[0].as_py()
    assert events > 0 and memories == 0  # the events stay; no memory without its embedding

    out = run_ingest(Path(SAMPLE), "jsonl", None, config, show_progress=False)
    assert out["events_new"] == 0
    assert sum(r["level0_created"] for r in out["indexed"].values()) == events
    assert sum(r["embedded"] for r in out["indexed"].values()) == events
    # where the run's time went (runtime/phases.py): the flow's phases, and the one local encoder's
    # report with the Encoder's own timings of this run's texts
    assert {"parse", "commit_events", "plan", "level0_rows", "encoder_wait", "index_builds"} <= set(
        out["phases"]
    )
    assert all(v >= 0 for k, v in out["phases"].items() if k != "other")
    [report] = out["encoders"]
    assert report["texts"] == events and report["busy_s"] > 0
    assert report["encoder"]["texts"] == events and report["encoder"]["tokenise_s"] > 0
    assert (
        store.query("SELECT count(*) AS n FROM memories WHERE embedding IS NULL").column("n")[0].as_py() == 0
    )
