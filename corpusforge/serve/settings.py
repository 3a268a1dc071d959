"""Settings of the query endpoint: where the snapshot lives and the limits it enforces."""

from __future__ import annotations

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
        max_query_chars: the longest accepted query.
        max_k: the largest accepted k.
        max_batch: the most queries in one ``/search/batch`` request.
        max_filters: the most filter keys (and values per key) in one request.
        encode_batch: the most queries the micro-batcher encodes in one call.
        encode_wait_ms: how long the micro-batcher waits for company after the first query
            (0: take only what is already queued).
        search_threads: worker threads running searches (and int8 query encoding) off the event
            loop. A few more than the cores: encoding and FAISS release the GIL, the Python
            around them does not, so many more threads only contend (2 cores, dense at
            concurrency 16: 191 req/s with 1 thread, 300 with 2, 340 with 3).
        faiss_threads: OpenMP threads per FAISS call (1 suits many concurrent small searches).
        query_runtime: what encodes queries: ``auto`` (int8 ONNX on a CPU when it agrees with
            the torch encoder, torch on a GPU), ``onnx-int8`` or ``torch``.
        encode_threads: intra-op threads per int8 encoder call.
        export_dir: cache of int8 query-encoder exports (default ``~/.cache/corpusforge/onnx``).
        query_tower: encode queries with the snapshot's distilled query tower when it has one
            (faster; its quality is in the manifest's ``*-tower`` metrics). False uses the full model.
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
    max_query_chars: int = Field(default=1024, ge=1)
    max_k: int = Field(default=100, ge=1)
    max_batch: int = Field(default=64, ge=1)
    max_filters: int = Field(default=16, ge=1)
    encode_batch: int = Field(default=32, ge=1)
    encode_wait_ms: float = Field(default=1.0, ge=0)
    search_threads: int = Field(default=3, ge=1)
    faiss_threads: int = Field(default=1, ge=1)
    query_runtime: Literal["auto", "onnx-int8", "torch"] = "auto"
    encode_threads: int = Field(default=1, ge=1)
    export_dir: Path | None = None
    query_tower: bool = True
