"""Opening a fetched snapshot directory as a ready `Searcher` (library side of serving).

A snapshot directory (``SnapshotStore.fetch`` output) holds ``chunks/``, ``dense/``, ``bm25/``,
``eval/metrics.json`` and ``manifest.json``. `open_snapshot` builds the query encoder from the
manifest's model config, opens the indexes read-only and runs one query per mode as a smoke test,
so a snapshot that cannot answer is refused before it is ever swapped in.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from corpusforge.search import MODES, UNRESTRICTED, Searcher
from corpusforge.spec import ModelConfig, SearchConfig

_ENCODERS: dict[str, Any] = {}
_ENCODERS_LOCK = threading.Lock()


@dataclass
class LoadedSnapshot:
    """A snapshot opened for serving.

    Attributes:
        index: the index name.
        version: the version id.
        path: the local (verified, read-only) snapshot directory.
        manifest: the manifest dict.
        searcher: the searcher over the snapshot.
        encode: ``f(list[str]) -> float32 (n, d)`` query embeddings (None without a dense index).
        modes: the search modes this snapshot supports.
        reranker: the snapshot's late-interaction reranker (`train.rerank.Reranker`), or None.
        loaded_at: UTC epoch seconds when loading finished.
        load_seconds: how long fetching, verifying and opening took.
    """

    index: str
    version: str
    path: Path
    manifest: dict[str, Any]
    searcher: Searcher
    encode: Callable[[list[str]], np.ndarray] | None
    modes: tuple[str, ...]
    reranker: Any | None = None
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The manifest facts a client may want to see (no local paths).

        Returns:
            index, version, created_at, corpus_hash, model (name, fingerprint, dim), index
            parameters, file count and bytes, spec name, modes, has_reranker.
        """
        m = self.manifest
        model = m.get("model") or {}
        files = m.get("files") or []
        return {
            "index": self.index,
            "version": self.version,
            "created_at": m.get("created_at"),
            "corpus_hash": m.get("corpus_hash"),
            "spec_name": (m.get("spec") or {}).get("name"),
            "model": {k: model.get(k) for k in ("name", "fingerprint", "encoder_fingerprint", "dim")},
            "index_params": _strip_paths(m.get("index") or {}),
            "n_files": len(files),
            "total_bytes": int(sum(f.get("size", 0) for f in files)),
            "n_chunks": self.searcher.n,
            "n_docs": self.searcher.n_docs,
            "modes": list(self.modes),
            "has_reranker": self.reranker is not None,
        }


def _strip_paths(value: Any) -> Any:
    """Drop any absolute-path-looking strings from manifest data shown to clients."""
    if isinstance(value, dict):
        return {k: _strip_paths(v) for k, v in value.items() if not (isinstance(v, str) and v.startswith("/"))}
    if isinstance(value, list):
        return [_strip_paths(v) for v in value]
    return value


def shared_encoder(cfg: ModelConfig) -> Callable[[list[str]], np.ndarray]:
    """The query-encoding function for a model config, loaded once per process.

    Successive snapshots built with the same model share the encoder, so a hot swap does not
    load the model again.

    Args:
        cfg: the model config (the manifest's ``model.config``).

    Returns:
        ``encoder.encode_queries`` behind a lock (the same function object for equal configs).
    """
    from corpusforge.encoder import Encoder

    key = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    with _ENCODERS_LOCK:
        fn = _ENCODERS.get(key)
        if fn is None:
            encoder, lock = Encoder(cfg), threading.Lock()

            def encode(texts: list[str]) -> np.ndarray:
                # One call at a time: a fast tokenizer used from two threads at once fails
                # ("Already borrowed"), and a swap's smoke test may overlap the serving batcher.
                with lock:
                    return encoder.encode_queries(texts)

            fn = _ENCODERS[key] = encode
    return fn


def search_config(manifest: dict[str, Any]) -> SearchConfig:
    """The search settings recorded in a manifest's spec (defaults when absent)."""
    raw = (manifest.get("spec") or {}).get("search")
    return SearchConfig.model_validate(raw) if raw else SearchConfig()


def open_snapshot(path: str | Path, manifest: dict[str, Any] | None = None) -> LoadedSnapshot:
    """Open a verified snapshot directory as a `LoadedSnapshot` and smoke-test every mode.

    Args:
        path: the snapshot directory (with ``chunks/`` and ``dense/`` and/or ``bm25/``).
        manifest: its manifest (read from ``path/manifest.json`` when None).

    Returns:
        The loaded snapshot.

    Raises:
        FileNotFoundError: the chunk store or both indexes are missing.
        ValueError: the model config is invalid, the index row counts disagree with the chunks,
            or a smoke query fails.
    """
    t0 = time.perf_counter()
    path = Path(path)
    if manifest is None:
        manifest = json.loads((path / "manifest.json").read_text())
    if not (path / "chunks").is_dir():
        raise FileNotFoundError("snapshot has no chunks/ directory")
    has_dense = (path / "dense").is_dir()
    encode = None
    if has_dense:
        cfg = ModelConfig.model_validate((manifest.get("model") or {}).get("config") or {})
        encode = shared_encoder(cfg)
    searcher = Searcher.load(path, path / "chunks", encode, search_config(manifest), mmap=True)
    modes = tuple(m for m in MODES if (m != "bm25" or searcher.bm25) and (m == "bm25" or searcher.dense)
                  and (m != "hybrid" or searcher.bm25))
    for mode in modes:  # a snapshot that cannot answer is refused here, not by a client's query
        searcher.search("smoke test", k=1, mode=mode, acl=UNRESTRICTED)
    reranker = None
    if (path / "reranker").is_dir():
        from corpusforge.train.rerank import Reranker

        reranker = _Serialised(Reranker(path / "reranker"))
        reranker.rerank("smoke test", searcher.search("smoke test", k=2, mode=modes[0], acl=UNRESTRICTED), 1)
    return LoadedSnapshot(index=str(manifest.get("index_name")), version=str(manifest.get("version")), path=path,
                          manifest=manifest, searcher=searcher, encode=encode, modes=modes, reranker=reranker,
                          load_seconds=time.perf_counter() - t0)


class _Serialised:
    """One call at a time into a reranker: its fast tokenizer is not re-entrant across threads."""

    def __init__(self, reranker):
        self._reranker, self._lock = reranker, threading.Lock()
        self.depth = reranker.depth

    def rerank(self, query: str, hits, k: int):
        with self._lock:
            return self._reranker.rerank(query, hits, k)
