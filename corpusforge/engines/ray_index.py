"""The indexes on Ray: the local engine's files, built by tasks that each hold one part.

BM25 takes two passes over the chunks, one task per unit of rows: each task's document
frequencies and lengths, merged on the driver into the corpus's vocabulary, IDF and average
length; then each task's scores under those global statistics, assembled on the driver into the one
score matrix (`index.bm25`): the files `BM25Index.build` writes. Tasks hold their unit; the driver
holds the merged vocabulary and, while assembling, the score matrix.

Dense: trained once on the driver, one shard per task.

The driver trains the FAISS template (IVF / PQ / OPQ) on the local engine's sample: the same
seeded row choice (`index.dense.SEED`), gathered from the embeddings dataset without loading the
rest. Each shard task reads only its rows, clones the trained template, adds its vectors in the
local engine's blocks and writes ``shard-<i>.faiss``; it also answers the recall probe (its own
top-k, approximate and exact, for the sampled queries), which the driver merges as a sharded
search does. Memory per task is its shard; the driver holds the training sample and the probe.

So the shard files, ``dense.json`` (timings aside) and the recall are those of `DenseIndex.build`
for Flat, IVF and PQ factories; HNSW graphs are built with several threads and are not
byte-stable on either engine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from corpusforge.data import datasets
from corpusforge.engines import ray as rx
from corpusforge.spec import Bm25Config, DenseIndexConfig


def _row_units(path: Path, lo: int, hi: int) -> list[rx.Unit]:
    """Units covering rows ``lo:hi`` of a dataset."""
    units, offset = [], 0
    for f in sorted(str(p) for p in path.glob("part-*.parquet")):
        n = pq.ParquetFile(f).metadata.num_rows
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            units.append(rx.Unit(len(units), f, a - offset, b - offset))
        offset += n
    return units


def read_vectors(path: Path, lo: int, hi: int, dim: int) -> np.ndarray:
    """Rows ``lo:hi`` of an embeddings dataset as a float32 ``(hi - lo, dim)`` matrix."""
    out = np.empty((hi - lo, dim), dtype=np.float32)
    at = 0
    for unit in _row_units(path, lo, hi):
        col = rx.read_unit(unit, ["vector"]).column("vector").combine_chunks()
        out[at:at + len(col)] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), dim)
        at += len(col)
    return out


def gather_vectors(path: Path, rows: np.ndarray, dim: int) -> np.ndarray:
    """The vectors of sorted row numbers `rows`, streaming the dataset file by file."""
    out = np.empty((len(rows), dim), dtype=np.float32)
    offset, at = 0, 0
    for f in sorted(path.glob("part-*.parquet")):
        n = pq.ParquetFile(f).metadata.num_rows
        j = int(np.searchsorted(rows, offset + n))
        if j > at:
            col = pq.read_table(f, columns=["vector"]).column("vector").combine_chunks()
            mine = rows[at:j] - offset
            out[at:j] = col.take(mine).flatten().to_numpy(zero_copy_only=False).reshape(len(mine), dim)
            at = j
        offset += n
    return out


def _unit_texts(unit: dict[str, Any]) -> list[str]:
    return rx.read_unit(rx.Unit(**unit), ["text"]).column("text").to_pylist()


def _bm25_stats(unit: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    from corpusforge.index.bm25 import shard_stats

    return shard_stats(_unit_texts(unit), Bm25Config(**cfg))


def _bm25_postings(unit: dict[str, Any], cfg: dict[str, Any], stats: Any, first_row: int):
    from corpusforge.index.bm25 import shard_postings

    return shard_postings(_unit_texts(unit), Bm25Config(**cfg), stats, first_row)


def bm25(chunks: Path, out: Path, cfg: Bm25Config, execution) -> Any:
    """Build the BM25 index of a chunks dataset on Ray, in two passes (see the module docstring).

    Args:
        chunks: the chunks dataset.
        out: the index directory (replaced atomically).
        cfg: the spec's BM25 section.
        execution: the spec's execution section (``rows_per_task``: rows per task).

    Returns:
        The `BM25Index`, equal to `BM25Index.build` over the chunk texts.

    Raises:
        ValueError: the dataset has no rows.
    """
    import ray

    from corpusforge.index.bm25 import BM25Index, CorpusStats

    rx.connect(execution)
    t0 = time.perf_counter()
    units = rx.plan_units(chunks, execution.rows_per_task)
    firsts = np.concatenate([[0], np.cumsum([u.stop - u.start for u in units])]).tolist()
    if firsts[-1] == 0:
        raise ValueError("cannot build a BM25 index from 0 texts")
    conf = cfg.model_dump(mode="json")
    stats_task = ray.remote(num_cpus=1)(_bm25_stats)
    stats = CorpusStats.merge(ray.get([stats_task.remote(u.as_dict(), conf) for u in units]), cfg)
    postings_task = ray.remote(num_cpus=1)(_bm25_postings)
    stats_ref = ray.put(stats)
    parts = ray.get([postings_task.remote(u.as_dict(), conf, stats_ref, int(first))
                     for u, first in zip(units, firsts, strict=False)])
    index = BM25Index.from_postings(parts, stats, cfg)
    index.info = {"build_seconds": round(time.perf_counter() - t0, 3)}  # bm25.json: the local engine's facts
    index.save(out)
    return index


def _build_shard(s: int, lo: int, hi: int, embeddings: str, dim: int, template: bytes, cfg: dict,
                 factory: str, queries: np.ndarray, k: int, out: str) -> dict[str, Any]:
    """One shard: add rows ``lo:hi`` to a clone of the trained template, write it, probe recall."""
    import faiss

    from corpusforge.index.dense import ADD_BLOCK, DenseIndex, _set_refine_k_factor, shard_file

    x = read_vectors(Path(embeddings), lo, hi, dim)
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or infinite values")
    idx = faiss.deserialize_index(np.frombuffer(template, dtype=np.uint8))
    _set_refine_k_factor(idx)
    started = time.perf_counter()
    for b in range(0, hi - lo, ADD_BLOCK):
        idx.add(x[b:b + ADD_BLOCK])
    add_s = time.perf_counter() - started
    faiss.write_index(idx, str(Path(out) / shard_file(s)))
    one = DenseIndex(shards=[idx], offsets=np.array([0, hi - lo], dtype=np.int64), factory=factory, dim=dim,
                     cfg=DenseIndexConfig(**cfg))
    kk = min(k, hi - lo)
    found_d, found_i = one.search(queries, kk)
    exact_d, exact_i = faiss.knn(queries, x, kk, metric=faiss.METRIC_INNER_PRODUCT)
    return {"found": (found_d, np.where(found_i >= 0, found_i + lo, -1)),
            "exact": (exact_d, np.where(exact_i >= 0, exact_i + lo, -1)), "add_seconds": add_s}


def dense(embeddings: Path, out: Path, cfg: DenseIndexConfig, execution) -> tuple[Any, int]:
    """Build the sharded dense index of an embeddings dataset on Ray.

    Args:
        embeddings: the embeddings dataset.
        out: the index directory (replaced atomically).
        cfg: the spec's dense index section.
        execution: the spec's execution section.

    Returns:
        ``(index, rows)``: the index (shards memory-mapped from `out`) and its row count.

    Raises:
        ValueError: as `DenseIndex.build` (no vectors, too many shards, a bad factory, too few
            training vectors, NaN or infinite values).
    """
    import faiss
    import ray

    from corpusforge.index.dense import (RECALL_K, SEED, DenseIndex, _read_shard, index_template, merge_topk,
                                         recall_at_k, shard_file, shard_offsets, training_rows)

    rx.connect(execution)
    t0 = time.perf_counter()
    n = datasets.count_rows(embeddings)
    dim = int(datasets.dataset_info(embeddings)["dim"])
    factory, template = index_template(n, dim, cfg)

    train_rows, train_s = 0, 0.0
    rows = training_rows(template, n, cfg)  # the local engine's sample: same seed, same rows
    if rows is not None:
        started = time.perf_counter()
        template.train(gather_vectors(embeddings, rows, dim))
        train_rows, train_s = len(rows), time.perf_counter() - started
    nq = min(cfg.recall_sample_queries, n)
    queries = gather_vectors(embeddings, np.sort(np.random.default_rng(SEED + 1).choice(n, size=nq, replace=False)),
                             dim)
    k = min(RECALL_K, n)
    offsets = shard_offsets(n, cfg.shards)
    template_ref = ray.put(faiss.serialize_index(template).tobytes())
    queries_ref = ray.put(queries)
    build = ray.remote(num_cpus=1)(_build_shard)
    started = time.perf_counter()
    with datasets.atomic_dir(out) as tmp:
        results = ray.get([build.remote(s, int(offsets[s]), int(offsets[s + 1]), str(embeddings), dim, template_ref,
                                        cfg.model_dump(mode="json"), factory, queries_ref, k, str(tmp))
                           for s in range(cfg.shards)])
        add_s = time.perf_counter() - started
        _, found = merge_topk([r["found"][0] for r in results], [r["found"][1] for r in results], k)
        _, truth = merge_topk([r["exact"][0] for r in results], [r["exact"][1] for r in results], k)
        shards = [_read_shard(tmp / shard_file(s), mmap=False)[0] for s in range(cfg.shards)]
        index = DenseIndex(shards=shards, offsets=offsets, factory=factory, dim=dim, cfg=cfg,
                           load_modes=["memory"] * cfg.shards)
        index.info = {
            "factory_requested": cfg.factory,
            "train_rows": train_rows,
            "train_seconds": round(train_s, 6),
            "add_seconds": round(add_s, 6),
            "build_seconds": round(time.perf_counter() - t0, 6),
            "recall_at_10": round(recall_at_k(found, truth), 6),
            "recall_queries": nq,
            "gpu_training": False,
            # the class FAISS builds (IndexFlat), not the one it reads back (IndexFlatIP): as the local engine
            "index_type": type(faiss.downcast_index(faiss.clone_index(template))).__name__,
        }
        meta = index.report()
        meta.pop("load_modes")
        (tmp / "dense.json").write_text(json.dumps(meta, indent=2) + "\n")
    return index, n
