"""Prometheus metrics for `memstage serve`: request counts and latency, KV cache reuse, store size; `/metrics`.

Namespace names appear only with `memstage serve --metrics-namespaces`; by default the memories
gauge is summed per level.

`mount_metrics(app, ...)` adds the `/metrics` route and a timing middleware to a FastAPI app. The
KV cache and store figures are read when Prometheus scrapes (a custom collector), so nothing on the
request path pays for them. Each `Metrics` has its own registry: two servers (or two tests) in one
process never share counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from memstage.stores import queries

# A query is about 10-100 ms of retrieval plus up to seconds of generation on CPU.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

CacheStatsFn = Callable[[], dict[str, Any] | None]


def generator_cache_stats(generator: Any) -> dict[str, Any] | None:
    """The prefix KV cache counters of a transformers `Generator` (None for engines without our cache)."""
    cache = getattr(generator, "kv_cache", None)
    return cache.stats.as_dict() if cache is not None else None


class _ScrapeCollector(Collector):
    """KV cache counters and memories per namespace/level, computed at scrape time."""

    def __init__(self, cache_stats: CacheStatsFn | None, store: Any | None, namespaces: bool = False) -> None:
        self.cache_stats = cache_stats
        self.store = store
        self.namespaces = namespaces  # namespace names as labels only when the operator opts in

    def collect(self) -> Iterator[Any]:
        stats = self.cache_stats() if self.cache_stats else None
        if stats:
            for name, key, doc in (
                ("memstage_kv_cache_lookups", "lookups", "prompt prefix lookups"),
                ("memstage_kv_cache_hits", "hits", "lookups that reused at least one token"),
                ("memstage_kv_cache_lookup_tokens", "lookup_tokens", "prompt tokens looked up"),
                ("memstage_kv_cache_hit_tokens", "hit_tokens", "prompt tokens served from the cache"),
                ("memstage_kv_cache_evictions", "evictions", "cached spans evicted"),
            ):
                c = CounterMetricFamily(name, doc)
                c.add_metric([], float(stats.get(key, 0)))
                yield c
            for name, key, doc in (
                (
                    "memstage_kv_cache_hit_rate",
                    "hit_token_share",
                    "share of prompt tokens served from the cache",
                ),
                ("memstage_kv_cache_bytes", "bytes", "bytes of KV held"),
                ("memstage_kv_cache_capacity_bytes", "capacity_bytes", "KV cache byte budget"),
            ):
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], float(stats.get(key, 0)))
                yield g
        if self.store is not None:
            labels = ["namespace", "level"] if self.namespaces else ["level"]
            g = GaugeMetricFamily("memstage_memories", "active memories per level", labels=labels)
            try:
                rows = queries.active_memory_counts(self.store)
            except Exception:  # noqa: BLE001 - a busy or missing store must not break the scrape
                rows = []
            totals: dict[tuple[str, ...], float] = {}
            for r in rows:
                key = (r["namespace"], str(r["level"])) if self.namespaces else (str(r["level"]),)
                totals[key] = totals.get(key, 0.0) + float(r["n"])
            for key, n in sorted(totals.items()):
                g.add_metric(list(key), n)
            yield g

    def describe(self) -> Iterable[Any]:
        return []  # figures are dynamic; no collect() at registration time


class Metrics:
    """The server's registry and its request metrics."""

    def __init__(
        self, *, cache_stats: CacheStatsFn | None = None, store: Any | None = None, namespaces: bool = False
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "memstage_requests", "HTTP requests", ["path", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "memstage_request_seconds",
            "time to answer a request",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "memstage_tokens", "tokens handled", ["kind"], registry=self.registry
        )  # kind: evidence | prompt | completion | cached
        self.registry.register(_ScrapeCollector(cache_stats, store, namespaces))

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)

    def count_tokens(self, **kinds: int) -> None:
        """e.g. count_tokens(prompt=812, completion=40, cached=700) after an answer."""
        for kind, n in kinds.items():
            if n:
                self.tokens.labels(kind).inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def mount_metrics(
    app: Any, *, cache_stats: CacheStatsFn | None = None, store: Any | None = None, namespaces: bool = False
) -> Metrics:
    """Add GET /metrics and per-request timing to a FastAPI app; returns the Metrics for custom counts.

    `namespaces`: label the memories gauge with namespace names (off by default: one tenant's
    scrape must not list the others)."""
    from starlette.requests import Request
    from starlette.responses import Response

    metrics = Metrics(cache_stats=cache_stats, store=store)

    @app.middleware("http")
    async def _time_requests(request: Request, call_next: Callable[[Request], Any]) -> Any:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            if request.url.path != "/metrics":
                # the route template, not the raw path: ids in paths would explode label cardinality
                route = request.scope.get("route")
                metrics.observe(getattr(route, "path", request.url.path), status, time.perf_counter() - start)

    @app.get("/metrics", include_in_schema=False)
    def _metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.state.metrics = metrics
    return metrics
