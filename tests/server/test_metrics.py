"""The Prometheus `/metrics` endpoint: scraped from a real uvicorn server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest


def serve(app) -> tuple[str, object]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise TimeoutError("uvicorn did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


@pytest.fixture
def metrics_server(indexed_sample):
    from fastapi import FastAPI

    from memstage.gpu.kv_cache import CacheStats
    from memstage.server.metrics import generator_cache_stats, mount_metrics

    stats = CacheStats(lookups=4, hits=3, misses=1, lookup_tokens=400, hit_tokens=300, capacity_bytes=1 << 20)
    generator = SimpleNamespace(kv_cache=SimpleNamespace(stats=stats))  # what gpu.generator exposes
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"data": []}

    mount_metrics(app, cache_stats=lambda: generator_cache_stats(generator), store=indexed_sample)
    url, server = serve(app)
    yield url
    server.should_exit = True


def test_metrics_endpoint_reports_requests_kv_cache_and_memories(metrics_server):
    from prometheus_client.parser import text_string_to_metric_families

    for _ in range(3):
        assert httpx.get(f"{metrics_server}/v1/models").status_code == 200
    assert httpx.get(f"{metrics_server}/missing").status_code == 404
    r = httpx.get(f"{metrics_server}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }
    assert samples[("memstage_requests_total", (("path", "/v1/models"), ("status", "200")))] == 3
    assert samples[("memstage_requests_total", (("path", "/missing"), ("status", "404")))] == 1
    assert samples[("memstage_request_seconds_count", (("path", "/v1/models"),))] == 3
    assert samples[("memstage_kv_cache_hit_rate", ())] == pytest.approx(0.75)
    assert samples[("memstage_kv_cache_hit_tokens_total", ())] == 300
    assert samples[("memstage_memories", (("level", "0"),))] == 19  # summed: no namespace names by default
    assert "demo" not in r.text


def test_metrics_name_namespaces_only_when_the_operator_opts_in(indexed_sample):
    from memstage.server.metrics import Metrics

    assert 'namespace="demo"' in Metrics(store=indexed_sample, namespaces=True).render().decode()
    assert "demo" not in Metrics(store=indexed_sample).render().decode()
