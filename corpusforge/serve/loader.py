"""Opening a fetched snapshot directory as a ready `Searcher` (library side of serving).

A snapshot directory (``SnapshotStore.fetch`` output) holds ``chunks/``, ``dense/``, ``bm25/``,
``eval/metrics.json``, ``manifest.json`` and, when the spec distils one, ``query_tower/``.
`open_snapshot` builds the query encoder from the manifest's model config (the query tower's
weights when there is a tower), opens the indexes read-only and runs one query per mode as a smoke
test, so a snapshot that cannot answer is refused before it is ever swapped in.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from corpusforge.data.datasets import read_table
from corpusforge.retrieval.search import MODES, UNRESTRICTED, Searcher
from corpusforge.snapshots.build import SHIPPED_MODEL
from corpusforge.snapshots.consistency import consistency_problems, json_reader
from corpusforge.snapshots.nofollow import pin_tree
from corpusforge.spec import ModelConfig, SearchConfig

log = logging.getLogger("corpusforge.serve")
# A few recent encoders, so a hot swap between snapshots of one model reuses it; bounded, since
# each snapshot with its own query tower brings its own weights.
_ENCODERS: OrderedDict[str, Any] = OrderedDict()
_ENCODERS_KEPT = 3
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
        query_encoder: what encodes the queries (`QueryEncoder.info`), None without a dense index.
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
    query_encoder: dict[str, Any] | None = None
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
            "query_encoder": self.query_encoder,
        }


def _strip_paths(value: Any) -> Any:
    """Drop any absolute-path-looking strings from manifest data shown to clients."""
    if isinstance(value, dict):
        return {k: _strip_paths(v) for k, v in value.items() if not (isinstance(v, str) and v.startswith("/"))}
    if isinstance(value, list):
        return [_strip_paths(v) for v in value]
    return value


@dataclass
class QueryEncoder:
    """A process-wide query encoder and what it is.

    Attributes:
        encode: ``f(list[str]) -> float32 (n, d)``; safe to call from several threads.
        info: runtime (``torch`` or ``onnx-int8``), its settings, and for int8 the agreement with
            the torch encoder on probe texts, or why int8 is not in use.
    """

    encode: Callable[[list[str]], np.ndarray]
    info: dict[str, Any]


def shared_encoder(cfg: ModelConfig, runtime: str = "auto", threads: int = 1, probes: list[str] | None = None,
                   export_dir: str | Path | None = None) -> QueryEncoder:
    """The query encoder for a model config, built once per process.

    Successive snapshots built with the same model share it, so a hot swap does not load the
    model again. With runtime ``auto`` or ``onnx-int8`` an int8 ONNX export is used when it
    agrees with the torch encoder on the probe texts (`onnx_query.agreement`); otherwise, or
    when the export fails, the torch encoder serves and ``info["fallback"]`` says why.
    ``auto`` keeps torch on a GPU, where fp16 torch is the faster of the two.

    Args:
        cfg: the model config (the manifest's ``model.config``).
        runtime: ``auto``, ``onnx-int8`` or ``torch``.
        threads: intra-op threads of the int8 runtime per call.
        probes: texts for the agreement check; without any, int8 cannot be checked and torch
            serves.
        export_dir: cache of int8 exports (default `onnx_query.default_export_dir`).

    Returns:
        The encoder (the same object for equal arguments).
    """
    from corpusforge.encoding.encoder import Encoder
    from corpusforge.encoding.models import model_fingerprint

    # Keyed by the weights, not their path: every fetched copy of one tower shares an encoder.
    key = json.dumps([cfg.model_dump(mode="json", exclude={"name"}), model_fingerprint(cfg.name), runtime, threads],
                     sort_keys=True)
    with _ENCODERS_LOCK:
        found = _ENCODERS.get(key)
        if found is not None:
            _ENCODERS.move_to_end(key)
        else:
            encoder, lock = Encoder(cfg), threading.Lock()

            def encode(texts: list[str]) -> np.ndarray:
                # One call at a time: a fast tokenizer used from two threads at once fails
                # ("Already borrowed"), and a swap's smoke test may overlap the serving threads.
                with lock:
                    return encoder.encode_queries(texts)

            found = QueryEncoder(encode, {"runtime": "torch", "precision": encoder.precision})
            if runtime == "onnx-int8" or (runtime == "auto" and encoder.device.type == "cpu"):
                found = _int8_or(found, encoder, threads, probes or [], export_dir)
            _ENCODERS[key] = found
            while len(_ENCODERS) > _ENCODERS_KEPT:
                _ENCODERS.popitem(last=False)
    return found


def _int8_or(torch_encoder: QueryEncoder, encoder, threads: int, probes: list[str],
             export_dir: str | Path | None) -> QueryEncoder:
    """The int8 ONNX encoder when it can be built and agrees with torch, else `torch_encoder`."""
    if not probes:
        return QueryEncoder(torch_encoder.encode, {**torch_encoder.info, "fallback": "no probe texts to check int8"})
    try:
        from corpusforge.encoding.onnx_query import agreement, load_int8

        onnx_encoder = load_int8(encoder, export_dir, threads)
        agreed = agreement(torch_encoder.encode, onnx_encoder.encode_queries, probes)
    except Exception as exc:  # no onnxruntime, an architecture the exporter cannot trace...
        log.warning("int8 query encoder unavailable, serving with torch: %s", exc)
        return QueryEncoder(torch_encoder.encode, {**torch_encoder.info, "fallback": f"int8 export failed: {exc}"})
    figures = {"probes": agreed.n, "min_cosine": round(agreed.min_cosine, 5),
               "mean_cosine": round(agreed.mean_cosine, 5)}
    if not agreed.ok:
        log.warning("int8 query encoder disagrees with torch (%s), serving with torch", figures)
        return QueryEncoder(torch_encoder.encode, {**torch_encoder.info, "fallback": "int8 disagrees with torch",
                                                   "int8_agreement": figures})
    log.info("query encoder: int8 ONNX (%s)", figures)
    return QueryEncoder(onnx_encoder.encode_queries, {**onnx_encoder.report(), "agreement": figures})


def probe_texts(chunks_path: Path, n: int = 64, words: int = 12) -> list[str]:
    """Query-like probe texts from a snapshot: the first words of evenly spaced chunks.

    Args:
        chunks_path: the chunks dataset.
        n: how many probes.
        words: words per probe.

    Returns:
        Up to n non-empty texts.
    """
    texts = read_table(chunks_path, columns=["text"]).column("text")
    step = max(1, len(texts) // n)
    picked = (" ".join((texts[i].as_py() or "").split()[:words]) for i in range(0, len(texts), step))
    return [t for t in picked if t][:n]


def search_config(manifest: dict[str, Any]) -> SearchConfig:
    """The search settings recorded in a manifest's spec (defaults when absent)."""
    raw = (manifest.get("spec") or {}).get("search")
    return SearchConfig.model_validate(raw) if raw else SearchConfig()


def open_snapshot(path: str | Path, manifest: dict[str, Any] | None = None, query_runtime: str = "auto",
                  encode_threads: int = 1, export_dir: str | Path | None = None,
                  query_tower: bool = True) -> LoadedSnapshot:
    """Open a verified snapshot directory as a `LoadedSnapshot` and smoke-test every mode.

    Args:
        path: the snapshot directory (with ``chunks/`` and ``dense/`` and/or ``bm25/``).
        manifest: its manifest (read from ``path/manifest.json`` when None).
        query_runtime: ``auto``, ``onnx-int8`` or ``torch`` (see `shared_encoder`).
        encode_threads: intra-op threads of the int8 query encoder.
        export_dir: cache of int8 exports.
        query_tower: encode queries with the snapshot's distilled query tower when it has one
            (False: with the full model, as the passages were).

    Returns:
        The loaded snapshot.

    Raises:
        FileNotFoundError: the chunk store or both indexes are missing.
        ValueError: the model config is invalid, the index row counts disagree with the chunks,
            or a smoke query fails.
        UnsafePathError: the snapshot directory or anything in it is a symbolic link or a special
            file, a file's size disagrees with the manifest, or a file changed while it was opened.
    """
    t0 = time.perf_counter()
    path = Path(path)
    # FAISS, bm25s and Arrow open files by name. Every file is held open first, reached without
    # following any link; once the libraries have opened theirs, the names must still lead to the
    # held files, so nothing was swapped in between (a link to a file outside the root above all).
    with pin_tree(path) as pinned:
        if manifest is None:
            manifest = json.loads(pinned.read_bytes("manifest.json"))
        pinned.check_sizes(manifest)
        problems = consistency_problems(manifest, json_reader(pinned.read_bytes))
        if problems:  # the check publish and verify run too, before anything is loaded
            raise ValueError("snapshot parts disagree: " + "; ".join(problems))
        snap = _open_pinned(path, manifest, query_runtime, encode_threads, export_dir, query_tower, t0)
        pinned.check_unchanged()
    return snap


def _open_pinned(path: Path, manifest: dict[str, Any], query_runtime: str, encode_threads: int,
                 export_dir: str | Path | None, query_tower: bool, t0: float) -> LoadedSnapshot:
    """`open_snapshot` once the snapshot's files are pinned (same arguments; ``t0``: the start)."""
    if not (path / "chunks").is_dir():
        raise FileNotFoundError("snapshot has no chunks/ directory")
    has_dense = (path / "dense").is_dir()
    encode, encoder_info = None, None
    if has_dense:
        cfg = ModelConfig.model_validate((manifest.get("model") or {}).get("config") or {})
        if cfg.name == SHIPPED_MODEL:  # a trained encoder travels inside its snapshot
            cfg = cfg.model_copy(update={"name": str(path / SHIPPED_MODEL)})
        tower = _tower(path, manifest) if query_tower else None
        if tower is not None:
            from corpusforge.encoding.query_tower import tower_model_config

            cfg = tower_model_config(cfg, path / "query_tower")
        query_encoder = shared_encoder(cfg, query_runtime, encode_threads, probe_texts(path / "chunks"), export_dir)
        encode, encoder_info = query_encoder.encode, {**query_encoder.info, "query_tower": tower}
    searcher = Searcher.load(path, path / "chunks", encode, search_config(manifest), mmap=True)
    modes = tuple(m for m in MODES if (m != "bm25" or searcher.bm25) and (m == "bm25" or searcher.dense)
                  and (m != "hybrid" or searcher.bm25))
    for mode in modes:  # a snapshot that cannot answer is refused here, not by a client's query
        searcher.search("smoke test", k=1, mode=mode, acl=UNRESTRICTED)
    reranker = None
    if (path / "reranker").is_dir():
        from corpusforge.retrieval.rerank import Reranker

        reranker = _Serialised(Reranker(path / "reranker"))
        reranker.rerank("smoke test", searcher.search("smoke test", k=2, mode=modes[0], acl=UNRESTRICTED), 1)
    return LoadedSnapshot(index=str(manifest.get("index_name")), version=str(manifest.get("version")), path=path,
                          manifest=manifest, searcher=searcher, encode=encode, modes=modes, reranker=reranker,
                          query_encoder=encoder_info, load_seconds=time.perf_counter() - t0)


def _tower(path: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """What the snapshot's query tower is and how it scored at build, or None without one."""
    from corpusforge.encoding.query_tower import read_tower_info

    info = read_tower_info(path / "query_tower")
    if info is None:
        return None
    metrics = manifest.get("metrics") or {}
    return {"layers": info.get("layers"), "teacher_layers": info.get("teacher_layers"),
            "holdout_cosine": (info.get("holdout_cosine") or {}).get("mean"),
            "ndcg@10": {m.removesuffix("-tower"): v.get("ndcg@10") for m, v in metrics.items()
                        if m.endswith("-tower")}}


class _Serialised:
    """One call at a time into a reranker: its fast tokenizer is not re-entrant across threads."""

    def __init__(self, reranker):
        self._reranker, self._lock = reranker, threading.Lock()
        self.depth = reranker.depth

    def rerank(self, query: str, hits, k: int):
        with self._lock:
            return self._reranker.rerank(query, hits, k)
