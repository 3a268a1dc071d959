"""Settings of the query endpoint: where the snapshot lives and the limits it enforces."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ServeSettings(BaseModel):
    """Configuration of one serving process.

    Attributes:
        root: the snapshot store root (a local directory or ``s3://bucket/prefix``).
        index: the index name under the root.
        alias: the alias to serve (followed when it moves).
        endpoint_url: the S3 endpoint for S3-compatible servers (MinIO, moto...).
        cache_dir: where remote snapshots are downloaded (default: the store's default cache).
        keys_file: a YAML file of API keys; None serves anonymously (public chunks only, no admin).
        poll_seconds: how often the alias is checked for a move; 0 disables polling.
        cache_size: entries of the LRU result cache; 0 disables it.
        max_body_bytes: the largest accepted request body (413 beyond it, by ``Content-Length`` or
            counted while a chunked body streams in).
        max_query_chars: the longest accepted query.
        max_k: the largest accepted k.
        max_batch: the most queries in one ``/search/batch`` request.
        max_filters: the most filter keys in one request.
        max_filter_values: the most wanted values of one filter key (a list value).
        max_filter_value_chars: the longest filter key or string filter value.
        micro_batch: the most concurrent queries searched in one call (see `batcher.MicroBatcher`).
        micro_batch_wait_ms: how long a free search thread waits for more queries before it
            starts (0: take only what is already queued; under load batches form anyway).
        search_threads: searches (with int8 query encoding) run at once off the event loop;
            None picks per snapshot (`auto_search_threads`). Encoding and FAISS release the GIL,
            the Python around them does not, so threads beyond that only contend.
        faiss_threads: OpenMP threads per FAISS call (1 suits many concurrent small searches).
        query_runtime: what encodes queries: ``auto`` (int8 ONNX on a CPU when it agrees with
            the torch encoder, torch on a GPU), ``onnx-int8`` or ``torch``.
        encode_threads: intra-op threads per int8 encoder call.
        export_dir: cache of int8 query-encoder exports (default ``~/.cache/corpusforge/onnx``).
        query_tower: encode queries with the snapshot's distilled query tower when it has one
            (faster; its quality is in the manifest's ``*-tower`` metrics). False uses the full model.
        freeze_gc: after each swap, move every live object out of the cyclic garbage collector's
            reach (`gc.freeze`), so a full collection does not stall requests for ~200 ms. It acts
            on the whole process, so only a process that does nothing but serve should set it
            (``corpusforge serve`` does); objects are still freed by reference counting.
        opentelemetry: FastAPI's native OpenTelemetry spans, metrics and logs through the global
            providers (configure them with the OpenTelemetry SDK). Off by default: the check for
            configured providers alone costs ~13 us per request. Prometheus metrics are always on.
    """

    model_config = ConfigDict(extra="forbid")

    root: str
    index: str
    alias: str = "production"
    endpoint_url: str | None = None
    cache_dir: Path | None = None
    keys_file: Path | None = None
    poll_seconds: float = Field(default=10.0, ge=0)
    cache_size: int = Field(default=4096, ge=0)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_query_chars: int = Field(default=1024, ge=1)
    max_k: int = Field(default=100, ge=1)
    max_batch: int = Field(default=64, ge=1)
    max_filters: int = Field(default=16, ge=1)
    max_filter_values: int = Field(default=16, ge=1)
    max_filter_value_chars: int = Field(default=256, ge=1)
    micro_batch: int = Field(default=32, ge=1)
    micro_batch_wait_ms: float = Field(default=0.0, ge=0)
    search_threads: int | None = Field(default=None, ge=1)
    faiss_threads: int = Field(default=1, ge=1)
    query_runtime: Literal["auto", "onnx-int8", "torch"] = "auto"
    encode_threads: int = Field(default=1, ge=1)
    export_dir: Path | None = None
    query_tower: bool = True
    freeze_gc: bool = False
    opentelemetry: bool = False


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def auto_search_threads(full_model_queries: bool, cpus: int | None = None) -> int:
    """How many searches to run at once when ``search_threads`` is not set.

    One per CPU, plus one when the full model encodes the queries: its longer GIL-free encoder
    calls leave room for another thread. Measured on 2 cores, dense at concurrency 16 (15 s),
    before micro-batching: with the 3-layer query tower 496 req/s with 2 threads, 408 with 3,
    p99 186 ms with 4; with the full 6-layer model 343 req/s with 3 threads, 284 with 2. With
    micro-batching and threads that pull their own batches, 2 threads beat 3 for the tower in each
    of three interleaved 15 s runs (648/745/647 against 632/710/612 req/s).

    Args:
        full_model_queries: queries go through the full passage model (no query tower).
        cpus: the CPU count (default `usable_cpus`).

    Returns:
        The thread count.
    """
    return (cpus or usable_cpus()) + (1 if full_model_queries else 0)
