"""Sharded dense indexes over FAISS: build, measure, save as plain files, memory-map, search.

A `DenseIndex` covers rows ``0..n-1`` of the chunks dataset (row ``i`` is vector ``i``), split
into ``cfg.shards`` contiguous shards. Each shard is an independent FAISS index built from one
factory string with the inner-product metric (vectors are expected L2-normalised, so inner
product is cosine similarity). IVF / PQ / OPQ stages are trained once, on a bounded random
sample of the whole corpus, and the trained empty index is cloned per shard, so all shards share
one set of centroids and codebooks.

On disk an index is a directory::

    shard-00000.faiss ... shard-NNNNN.faiss   # faiss.write_index, nothing else
    dense.json                                # factory, dim, shard offsets, params, recall

No pickles. `load(mmap=True)` maps the files read-only (see `_read_shard`), so many server
processes can share one copy in the page cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from corpusforge.data.datasets import atomic_dir
from corpusforge.index.factory import choose_factory
from corpusforge.index.vectors import ArrayVectors, VectorSource
from corpusforge.spec import DenseIndexConfig

log = logging.getLogger(__name__)

META_FILE = "dense.json"
FORMAT_VERSION = 1
RECALL_K = 10
SEED = 1234
ADD_BLOCK = 100_000  # rows per add() call: bounds temporary memory and gives progress lines
# A refine stage (e.g. "...,RFlat") with FAISS's default k_factor=1 re-scores only the k results the
# base index already returned, so it can reorder but never add a missed neighbour. We build refine
# indexes with k_factor=4 (the base index proposes 4k candidates, exact scores pick k); it is stored in
# the .faiss file and can be overridden per search call.
REFINE_K_FACTOR = 4.0



def index_template(n: int, dim: int, cfg: DenseIndexConfig) -> tuple[str, faiss.Index]:
    """The factory string for `n` vectors of `dim` and its untrained template index (both engines).

    Args:
        n: the number of vectors.
        dim: their dimension.
        cfg: the dense index settings (factory or ``auto``, shards, memory budget).

    Returns:
        ``(factory, template)``.

    Raises:
        ValueError: no vectors, more shards than vectors, or an invalid factory string.
    """
    if n == 0:
        raise ValueError("cannot build a dense index from 0 vectors")
    if cfg.shards > n:
        raise ValueError(f"cfg.shards={cfg.shards} exceeds the number of vectors ({n})")
    factory = choose_factory(n, dim, cfg.memory_budget_mb) if cfg.factory == "auto" else cfg.factory
    try:
        return factory, faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"invalid FAISS factory string {factory!r} for dim {dim}: {exc}") from None


def training_rows(template: faiss.Index, n: int, cfg: DenseIndexConfig) -> np.ndarray | None:
    """The rows a template is trained on: a sorted sample of at most ``train_sample`` (fixed seed).

    Both engines train on exactly these rows, so they build the same index.

    Returns:
        The row numbers, or None when the index type needs no training.

    Raises:
        ValueError: fewer sampled rows than the IVF list count.
    """
    if template.is_trained:
        return None
    m = min(n, cfg.train_sample)
    rows = np.sort(np.random.default_rng(SEED).choice(n, size=m, replace=False)) if m < n else np.arange(n)
    ivf = _ivf_of(template)
    if ivf is not None and m < ivf.nlist:
        raise ValueError(f"factory needs at least nlist={ivf.nlist} training vectors, got {m} "
                         f"(n={n}, train_sample={cfg.train_sample}); use fewer IVF lists")
    return rows

TIMINGS = ("train_seconds", "add_seconds", "build_seconds")

def shard_file(i: int) -> str:
    """File name of shard ``i`` inside an index directory."""
    return f"shard-{i:05d}.faiss"


def shard_offsets(n: int, shards: int) -> np.ndarray:
    """Contiguous split of ``n`` rows into ``shards`` near-equal parts.

    Args:
        n: number of rows.
        shards: number of shards.

    Returns:
        int64 array of ``shards + 1`` boundaries; shard ``i`` holds rows
        ``offsets[i]:offsets[i+1]``.
    """
    return (np.arange(shards + 1, dtype=np.int64) * n) // shards


def _check_vectors(vectors: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    """A C-contiguous float32 (n, d) copy/view of `vectors`, or a ValueError naming the problem."""
    arr = np.asarray(vectors)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (n, dim), got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{what} have dimension {arr.shape[1]}, the index has {dim}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what} must be floating point, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one CUDA device."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _ivf_of(index: faiss.Index) -> Any | None:
    """The IndexIVF inside `index` (through pre-transforms / refine wrappers), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _search_params(index: faiss.Index, ef_search: int, nprobe: int,
                   k_factor: float | None = None) -> tuple[Any, list[Any]]:
    """Per-call FAISS search parameters mirroring the structure of `index`.

    Per-call `SearchParameters` (rather than mutating ``index.nprobe`` / ``hnsw.efSearch``)
    keep concurrent searches with different settings from racing on shared index state.

    Args:
        index: a (possibly wrapped) FAISS index.
        ef_search: HNSW efSearch.
        nprobe: IVF nprobe.
        k_factor: refine depth multiplier (None: the index's own).

    Returns:
        ``(params or None, keepalive)``: SWIG does not hold references to nested parameter
        objects, so the caller keeps ``keepalive`` alive as long as ``params``.
    """
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        inner, keep = _search_params(index.index, ef_search, nprobe, k_factor)
        if inner is None:
            return None, keep
        p = faiss.SearchParametersPreTransform()
        p.index_params = inner
        return p, keep + [inner]
    if isinstance(index, faiss.IndexRefine):
        inner, keep = _search_params(index.base_index, ef_search, nprobe, k_factor)
        p = faiss.IndexRefineSearchParameters()
        p.k_factor = float(k_factor or index.k_factor)
        if inner is not None:
            p.base_index_params = inner
            keep = keep + [inner]
        return p, keep
    if isinstance(index, faiss.IndexIVF):
        p = faiss.SearchParametersIVF()
        p.nprobe = int(nprobe)
        return p, []
    if isinstance(index, faiss.IndexHNSW):
        p = faiss.SearchParametersHNSW()
        p.efSearch = int(ef_search)
        return p, []
    return None, []


def _set_refine_k_factor(index: faiss.Index) -> None:
    """Give every refine stage in `index` the default REFINE_K_FACTOR (see its comment)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        _set_refine_k_factor(index.index)
    elif isinstance(index, faiss.IndexRefine):
        index.k_factor = REFINE_K_FACTOR


def _read_shard(path: Path, mmap: bool) -> tuple[faiss.Index, str]:
    """Read one shard, memory-mapped when FAISS allows it for the index type.

    ``IO_FLAG_MMAP_IFC`` maps the stored codes in place (zero copy) for Flat, HNSW, IVF, PQ and
    refine indexes; plain ``IO_FLAG_MMAP`` maps only IVF inverted lists. We try them in that
    order and fall back to a normal read for types that support neither, recording the mode.

    Args:
        path: the ``.faiss`` file.
        mmap: try memory-mapping at all.

    Returns:
        ``(index, mode)`` with mode one of ``mmap_ifc``, ``mmap``, ``read``.
    """
    if mmap:
        for mode, flags in (("mmap_ifc", faiss.IO_FLAG_MMAP_IFC), ("mmap", faiss.IO_FLAG_MMAP)):
            try:
                return faiss.read_index(str(path), flags | faiss.IO_FLAG_READ_ONLY), mode
            except RuntimeError as exc:  # this index type cannot be mapped this way
                log.debug("%s: %s read failed (%s), trying the next mode", path, mode, exc)
        log.info("%s: index type cannot be memory-mapped; reading it into memory", path)
    return faiss.read_index(str(path)), "read"


def merge_topk(scores: list[np.ndarray], rows: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists (rows already global) into one top-k per query.

    Args:
        scores: per-shard ``(nq, k)`` float32 scores, higher is better.
        rows: per-shard ``(nq, k)`` int64 global rows, -1 for padding.
        k: results to keep.

    Returns:
        ``(scores, rows)`` of shape ``(nq, k)``, best first; ties keep shard order (lower rows).
    """
    d = np.concatenate(scores, axis=1)
    i = np.concatenate(rows, axis=1)
    order = np.argsort(-d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(i, order, axis=1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the exact top-k rows that the approximate top-k found.

    Args:
        found: ``(nq, k)`` rows from the index under test (-1 padding ignored).
        truth: ``(nq, k)`` exact rows.

    Returns:
        recall@k in [0, 1].
    """
    hits = 0
    total = 0
    for f, t in zip(found, truth):
        t = t[t >= 0]
        hits += len(np.intersect1d(f[f >= 0], t))
        total += len(t)
    return hits / total if total else 1.0


@dataclass
class BuildPlan:
    """What every shard of a build shares, decided once (on the driver, for the Ray engine).

    Attributes:
        factory: the resolved factory string.
        template: the trained, empty index every shard is cloned from.
        offsets: the shard boundaries.
        queries: the recall probe's queries (rows sampled with ``SEED + 1``).
        k: the probe's depth (``RECALL_K``, or fewer rows).
        train_rows: vectors the template was trained on (0: no training).
        train_seconds: training time.
        requested: the configured factory ('auto' or a string).
    """

    factory: str
    template: faiss.Index
    offsets: np.ndarray
    queries: np.ndarray
    k: int
    train_rows: int
    train_seconds: float
    requested: str

    @classmethod
    def make(cls, source: VectorSource, cfg: DenseIndexConfig, say=log.debug) -> "BuildPlan":
        """Choose the factory, train the template on the seeded sample and gather the probe's queries.

        Holds the training sample (at most ``cfg.train_sample`` vectors) while training.

        Raises:
            ValueError: as `DenseIndex.build`.
        """
        n, dim = source.n, source.dim
        factory, template = index_template(n, dim, cfg)
        train_rows, train_s = 0, 0.0
        rows = training_rows(template, n, cfg)
        if rows is not None:
            sample = _finite(_check_vectors(source.gather(rows), "vectors", dim))
            ivf = _ivf_of(template)
            if ivf is not None and _gpu_available():
                # k-means assignment is the expensive part of IVF training: run it on the GPU(s)
                ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
            say("dense: training %s on %d sampled vectors", type(faiss.downcast_index(template)).__name__, len(rows))
            started = time.perf_counter()
            template.train(sample)
            train_rows, train_s = len(rows), time.perf_counter() - started
            if ivf is not None and _gpu_available():
                ivf.clustering_index = None  # do not keep (or try to serialise) the GPU index
            del sample
        nq = min(cfg.recall_sample_queries, n)
        queries = np.ascontiguousarray(
            source.gather(np.sort(np.random.default_rng(SEED + 1).choice(n, size=nq, replace=False))), dtype=np.float32)
        return cls(factory=factory, template=template, offsets=shard_offsets(n, cfg.shards), queries=queries,
                   k=min(RECALL_K, n), train_rows=train_rows, train_seconds=train_s, requested=cfg.factory)

    def facts(self, probes: list[dict[str, Any]], build_seconds: float) -> dict[str, Any]:
        """The build's facts (``DenseIndex.info``) from every shard's `build_shard` probe, in shard order."""
        _, found = merge_topk([p["found"][0] for p in probes], [p["found"][1] for p in probes], self.k)
        _, truth = merge_topk([p["exact"][0] for p in probes], [p["exact"][1] for p in probes], self.k)
        return {
            "factory_requested": self.requested,
            "train_rows": self.train_rows,
            "train_seconds": round(self.train_seconds, 6),
            "add_seconds": round(sum(p["add_seconds"] for p in probes), 6),
            "build_seconds": round(build_seconds, 6),
            "recall_at_10": round(recall_at_k(found, truth), 6),
            "recall_queries": len(self.queries),
            "gpu_training": bool(self.train_rows and _gpu_available()),
            # the class FAISS builds (e.g. IndexFlat), not the one it reads back (IndexFlatIP)
            "index_type": type(faiss.downcast_index(faiss.clone_index(self.template))).__name__,
        }


def _finite(x: np.ndarray) -> np.ndarray:
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or infinite values")
    return x


def build_shard(template: faiss.Index, source: VectorSource, lo: int, hi: int, queries: np.ndarray, k: int,
                cfg: DenseIndexConfig, say=log.debug, label: str = "") -> tuple[faiss.Index, dict[str, Any]]:
    """One shard: rows ``lo:hi`` added in blocks to a clone of the trained template, and its recall probe.

    Holds one block of vectors (``ADD_BLOCK`` rows) besides the shard itself. The probe is the
    shard's own top-k for `queries`, approximate (the shard's search) and exact (brute-force inner
    product, merged block by block); `BuildPlan.facts` merges the shards' probes as a sharded
    search merges results, so the recall does not depend on the engine.

    Args:
        template: the trained empty index (`BuildPlan.template`).
        source: the vectors.
        lo: first row of the shard.
        hi: one past its last row.
        queries: the probe's queries.
        k: the probe's depth.
        cfg: the build's settings (the probe searches with its default parameters).
        say: the progress logger.
        label: the shard's name in progress lines.

    Returns:
        ``(shard, probe)``; the probe's rows are global.

    Raises:
        ValueError: a vector that is NaN or infinite, or of another dimension.
    """
    idx = faiss.clone_index(template)
    _set_refine_k_factor(idx)
    kk = min(k, hi - lo)
    exact_d = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    exact_i = np.full((len(queries), 0), -1, dtype=np.int64)
    add_s = 0.0
    for b in range(lo, hi, ADD_BLOCK):
        x = _finite(_check_vectors(source.read(b, min(b + ADD_BLOCK, hi)), "vectors", idx.d))
        started = time.perf_counter()
        idx.add(x)
        add_s += time.perf_counter() - started
        d, i = faiss.knn(queries, x, min(kk, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
        exact_d, exact_i = merge_topk([exact_d, d], [exact_i, np.where(i >= 0, i + b, -1)], kk)
        say("dense shard %s: added %d/%d vectors", label, min(b + ADD_BLOCK, hi) - lo, hi - lo)
    one = DenseIndex(shards=[idx], offsets=np.array([0, hi - lo], dtype=np.int64), factory="", dim=idx.d, cfg=cfg)
    found_d, found_i = one.search(queries, kk)
    return idx, {"found": (found_d, np.where(found_i >= 0, found_i + lo, -1)), "exact": (exact_d, exact_i),
                 "add_seconds": add_s}


@dataclass
class DenseIndex:
    """A sharded FAISS index over rows ``0..ntotal-1``; see the module docstring.

    Attributes:
        shards: the per-shard FAISS indexes.
        offsets: ``len(shards)+1`` row boundaries (shard ``i`` = rows ``offsets[i]:offsets[i+1]``).
        factory: the resolved FAISS factory string (never 'auto').
        dim: vector dimension.
        cfg: the config it was built with (default search parameters come from it).
        info: build facts (requested factory, recall, timings, training sample size).
    """

    shards: list[faiss.Index]
    offsets: np.ndarray
    factory: str
    dim: int
    cfg: DenseIndexConfig
    info: dict[str, Any] = field(default_factory=dict)
    load_modes: list[str] = field(default_factory=list)
    _params: dict[tuple[int, int, float | None], tuple[Any, list[Any]]] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, vectors: np.ndarray, cfg: DenseIndexConfig, progress: bool = True) -> "DenseIndex":
        """Build, train and measure a sharded index over a matrix in memory.

        Args:
            vectors: float32 ``(n, d)``; row ``i`` is chunk row ``i``. Expected L2-normalised.
            cfg: factory ('auto' or a FAISS factory string), shards, training sample size,
                default search parameters, recall sample size.
            progress: log one line per build step at INFO (DEBUG otherwise).

        Returns:
            The built index (shards in memory), with recall@10 against exact search recorded in
            ``report()``.

        Raises:
            ValueError: bad vectors (shape, dtype, NaN/inf), an unknown factory string, more
                shards than vectors, or too few training vectors for the IVF list count.
        """
        return cls.build_from(ArrayVectors(_check_vectors(vectors, "vectors")), cfg, progress=progress)

    @classmethod
    def build_from(cls, source: VectorSource, cfg: DenseIndexConfig, directory: str | Path | None = None,
                   progress: bool = True) -> "DenseIndex":
        """Build a sharded index from vectors read block by block (see `corpusforge.index.vectors`).

        Memory: the training sample and the recall probe's queries, one block of ``ADD_BLOCK``
        vectors, and the shard being built. With `directory`, each shard is written there (the
        directory is replaced atomically, with ``dense.json`` as `save` writes it) and dropped as
        soon as it is built, and the returned index maps the files: for an IVF-PQ index the
        build holds one shard's codes, never the corpus's vectors.

        Args:
            source: the vectors (row ``i`` is chunk row ``i``), expected L2-normalised.
            cfg: as for `build`.
            directory: write the index here instead of keeping its shards in memory.
            progress: log one line per build step at INFO (DEBUG otherwise).

        Returns:
            The index, recall@10 against exact search in ``report()``.

        Raises:
            ValueError: as `build`.
        """
        say = log.info if progress else log.debug
        t0 = time.perf_counter()
        plan = BuildPlan.make(source, cfg, say)
        out = Path(directory) if directory is not None else None
        shards, probes = [], []
        with atomic_dir(out) if out is not None else contextlib.nullcontext() as tmp:
            for s in range(cfg.shards):
                idx, probe = build_shard(plan.template, source, int(plan.offsets[s]), int(plan.offsets[s + 1]),
                                         plan.queries, plan.k, cfg, say=say, label=f"{s + 1}/{cfg.shards}")
                probes.append(probe)
                if tmp is None:
                    shards.append(idx)
                else:
                    faiss.write_index(idx, str(tmp / shard_file(s)))
                    del idx
            if tmp is not None:
                index = cls.assemble(tmp, plan, probes, cfg, time.perf_counter() - t0)
        if tmp is None:
            index = cls(shards=shards, offsets=plan.offsets, factory=plan.factory, dim=source.dim, cfg=cfg,
                        load_modes=["memory"] * cfg.shards)
            index.info = plan.facts(probes, time.perf_counter() - t0)
        say("dense index %s: n=%d dim=%d shards=%d recall@10=%.4f build=%.1fs", plan.factory, source.n, source.dim,
            cfg.shards, index.info["recall_at_10"], index.info["build_seconds"])
        return index

    @classmethod
    def assemble(cls, directory: Path, plan: BuildPlan, probes: list[dict[str, Any]], cfg: DenseIndexConfig,
                 build_seconds: float) -> "DenseIndex":
        """The index of shard files written into `directory` by `build_shard`: mapped, with ``dense.json`` written.

        Args:
            directory: holds ``shard-*.faiss`` of every shard.
            plan: the build's plan.
            probes: every shard's probe, in shard order.
            cfg: the build's settings.
            build_seconds: the build's time so far.

        Returns:
            The index, its shards memory-mapped where FAISS allows it.
        """
        read = [_read_shard(directory / shard_file(s), mmap=True) for s in range(cfg.shards)]
        index = cls(shards=[r[0] for r in read], offsets=plan.offsets, factory=plan.factory, dim=plan.template.d,
                    cfg=cfg, load_modes=[r[1] for r in read])
        index.info = plan.facts(probes, build_seconds)
        index._write_meta(directory)
        return index

    def measure_recall(self, vectors: np.ndarray, n_queries: int) -> tuple[float, int]:
        """recall@10 of this index (default search params) vs exact inner-product search.

        The queries are ``n_queries`` rows sampled from `vectors` with a fixed seed; the ground
        truth is brute-force inner product (``faiss.knn``, the same kernel IndexFlatIP uses,
        without copying the corpus into a second index).

        Args:
            vectors: the indexed vectors (row i = row i of the index).
            n_queries: number of sampled queries.

        Returns:
            ``(recall@10, number of queries used)``.
        """
        n = vectors.shape[0]
        nq = min(n_queries, n)
        rng = np.random.default_rng(SEED + 1)
        q = np.ascontiguousarray(vectors[np.sort(rng.choice(n, size=nq, replace=False))])
        k = min(RECALL_K, n)
        _, truth = faiss.knn(q, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
        _, found = self.search(q, k)
        return round(recall_at_k(found, truth), 6), nq

    # ----------------------------------------------------------------- search
    @property
    def ntotal(self) -> int:
        """Number of indexed vectors."""
        return int(self.offsets[-1])

    def _params_for(self, ef_search: int | None, nprobe: int | None, k_factor: float | None) -> Any:
        key = (int(ef_search or self.cfg.hnsw_ef_search), int(nprobe or self.cfg.ivf_nprobe), k_factor)
        cached = self._params.get(key)
        if cached is None:
            cached = self._params[key] = _search_params(self.shards[0], *key)
        return cached[0]

    def search(self, queries: np.ndarray, k: int, ef_search: int | None = None,
               nprobe: int | None = None, k_factor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product.

        Args:
            queries: float32 ``(nq, d)`` (a single ``(d,)`` vector is accepted too).
            k: results per query.
            ef_search: HNSW efSearch for this call (default ``cfg.hnsw_ef_search``).
            nprobe: IVF nprobe for this call (default ``cfg.ivf_nprobe``).
            k_factor: refine-stage depth multiplier for this call (default: stored in the index,
                REFINE_K_FACTOR for indexes built here).

        Returns:
            ``(scores, rows)``: float32 and int64 ``(nq, k)``, best first; rows are global chunk
            rows, -1 (score -inf) where fewer than k results exist.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.dtype != np.float32 or not q.flags.c_contiguous or q.shape[1] != self.dim:
            q = _check_vectors(q, "queries", self.dim)
        params = self._params_for(ef_search, nprobe, k_factor)
        if len(self.shards) == 1:  # the common case: no merge, no copies
            d, i = self.shards[0].search(q, k, params=params)
        else:
            ds, rs = [], []
            for s, idx in enumerate(self.shards):
                d, i = idx.search(q, k, params=params)
                rs.append(np.where(i >= 0, i + self.offsets[s], -1))
                ds.append(d)
            d, i = merge_topk(ds, rs, k)
        if k > self.ntotal or (i[:, -1] < 0).any():
            d = np.where(i >= 0, d, np.float32(-np.inf)).astype(np.float32, copy=False)
        return d, i

    # -------------------------------------------------------------- save/load
    # Build timings are reported (stage summary, MLflow) but not saved: equal data, equal files.
    def report(self) -> dict[str, Any]:
        """Plain-data facts about the index (also the body of ``dense.json``).

        Returns:
            factory, dim, ntotal, shards, shard offsets, metric, search params, recall@10, build
            timings, faiss version and the load mode of each shard.
        """
        return {
            "format_version": FORMAT_VERSION,
            "factory": self.factory,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "shards": len(self.shards),
            "shard_offsets": [int(o) for o in self.offsets],
            "shard_files": [shard_file(i) for i in range(len(self.shards))],
            "metric": "inner_product",
            "index_type": type(faiss.downcast_index(self.shards[0])).__name__,
            "params": {"ef_search": self.cfg.hnsw_ef_search, "nprobe": self.cfg.ivf_nprobe,
                       "train_sample": self.cfg.train_sample},
            "config": self.cfg.model_dump(mode="json"),
            "faiss_version": faiss.__version__,
            "load_modes": list(self.load_modes),
            **self.info,
        }

    def save(self, directory: str | Path) -> Path:
        """Write the shards and ``dense.json`` into `directory`, atomically (temp dir + rename).

        Args:
            directory: destination; replaced if it exists.

        Returns:
            The directory path.
        """
        with atomic_dir(directory) as tmp:
            for i, idx in enumerate(self.shards):
                faiss.write_index(idx, str(tmp / shard_file(i)))
            self._write_meta(tmp)
        return Path(directory)

    def _write_meta(self, directory: Path) -> None:
        meta = self.report()
        for volatile in ("load_modes", *TIMINGS):  # the files depend on the data, never on the clock
            meta.pop(volatile, None)
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> "DenseIndex":
        """Load an index written by `save`.

        Args:
            directory: the index directory.
            mmap: memory-map the shard files read-only where FAISS supports it for the type
                (the mode used per shard is in ``report()['load_modes']``).

        Returns:
            The index, ready to search.

        Raises:
            FileNotFoundError: no ``dense.json`` or a shard file is missing.
            ValueError: a shard does not match ``dense.json`` (dimension or row count).
        """
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{directory} is not a dense index (no {META_FILE})")
        meta = json.loads(meta_path.read_text())
        offsets = np.asarray(meta["shard_offsets"], dtype=np.int64)
        shards, modes = [], []
        for i, name in enumerate(meta["shard_files"]):
            path = directory / name
            if not path.exists():
                raise FileNotFoundError(f"dense index {directory}: shard file {name} is missing")
            idx, mode = _read_shard(path, mmap)
            expected = int(offsets[i + 1] - offsets[i])
            if idx.d != meta["dim"] or idx.ntotal != expected:
                raise ValueError(f"dense index {directory}: {name} has d={idx.d}, ntotal={idx.ntotal}; "
                                 f"{META_FILE} says d={meta['dim']}, ntotal={expected}")
            shards.append(idx)
            modes.append(mode)
        known = {"factory_requested", "train_rows", "recall_at_10", "recall_queries", "gpu_training"}
        return cls(shards=shards, offsets=offsets, factory=meta["factory"], dim=int(meta["dim"]),
                   cfg=DenseIndexConfig(**meta["config"]), info={k: meta[k] for k in known if k in meta},
                   load_modes=modes)
