"""Prometheus metrics of the query endpoint (one registry per app, so apps never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServeMetrics:
    """The endpoint's metrics.

    Attributes:
        registry: the registry ``/metrics`` exposes.
        requests: requests by endpoint, method and status.
        request_latency: request latency by endpoint.
        search_latency: search latency by mode (per query, cache hits included).
        cache_hits, cache_misses: result cache lookups.
        search_batch: queries per batched search call (see `batcher.MicroBatcher`).
        snapshot: the served index, version, alias and query-encoder runtime (an Info metric).
        snapshot_loaded: UTC epoch seconds of the last swap.
        refusals: snapshots refused.
        swaps: snapshots swapped in.
        gc_frozen: objects frozen out of the cyclic garbage collector (``freeze_gc``).
        search_threads: searches run at once off the event loop.
    """

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("corpusforge_requests", "HTTP requests", ["endpoint", "method", "status"], registry=r)
        self.request_latency = Histogram("corpusforge_request_latency_seconds", "HTTP request latency",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.search_latency = Histogram("corpusforge_search_latency_seconds", "Search latency per query",
                                        ["mode"], buckets=LATENCY_BUCKETS, registry=r)
        self.cache_hits = Counter("corpusforge_cache_hits", "Result cache hits", registry=r)
        self.cache_misses = Counter("corpusforge_cache_misses", "Result cache misses", registry=r)
        self.search_batch = Histogram("corpusforge_search_batch_size", "Queries per batched search call",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.snapshot = Info("corpusforge_snapshot", "The served snapshot", registry=r)
        self.snapshot_loaded = Gauge("corpusforge_snapshot_loaded_timestamp_seconds",
                                     "When the served snapshot was swapped in", registry=r)
        self.refusals = Counter("corpusforge_snapshot_refusals", "Snapshots refused (corrupt or unloadable)", registry=r)
        self.swaps = Counter("corpusforge_snapshot_swaps", "Snapshots swapped in", registry=r)
        self.gc_frozen = Gauge("corpusforge_gc_frozen_objects", "Objects moved out of the cyclic collector's reach "
                               "(gc.freeze after each swap; 0 when freeze_gc is off)", registry=r)
        self.search_threads = Gauge("corpusforge_search_threads", "Searches run at once off the event loop",
                                    registry=r)
