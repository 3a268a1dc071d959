"""The indexes on Ray: the local engine's files, built by tasks that each hold one part.

BM25 takes two passes over the chunks, one task per unit of rows: each task's document
frequencies and lengths, merged on the driver into the corpus's vocabulary, IDF and average
length; then each task's scores under those global statistics, which the driver writes into the
score matrix's files as they arrive, in row order (`index.bm25.ScoreMatrixWriter`): the files
`BM25Index.build` writes. Tasks hold their unit; the driver holds the merged vocabulary and one
unit's scores at a time.

Dense: planned once on the driver (`index.dense.BuildPlan`: the factory, the template trained on
the local engine's seeded sample, the recall probe's queries), one shard per task
(`index.dense.build_shard`, the local engine's own shard build): each task reads only its rows, in
the local engine's blocks, writes ``shard-<i>.faiss`` and returns its recall probe, which the
driver merges as a sharded search does. Memory per task is one block of vectors and its shard;
the driver holds the training sample and the probe's queries.

So the shard files, ``dense.json`` (timings aside) and the recall are those of the local engine
for Flat, IVF and PQ factories; HNSW graphs are built with several threads and are not
byte-stable on either engine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from corpusforge.data import datasets
from corpusforge.engines import ray as rx
from corpusforge.index.vectors import DatasetVectors
from corpusforge.spec import Bm25Config, DenseIndexConfig


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
    refs = [postings_task.remote(u.as_dict(), conf, stats_ref, int(first))
            for u, first in zip(units, firsts, strict=False)]

    def in_row_order():
        for i, ref in enumerate(refs):
            yield ray.get(ref)
            refs[i] = None  # one unit's scores at a time on the driver: release each once written

    index = BM25Index.write_postings(in_row_order(), stats, cfg, out)
    index.info = {"build_seconds": round(time.perf_counter() - t0, 3)}  # bm25.json: the local engine's facts
    return index


def _build_shard(s: int, lo: int, hi: int, embeddings: str, template: bytes, cfg: dict, queries: np.ndarray,
                 k: int, out: str) -> dict[str, Any]:
    """One shard task: `index.dense.build_shard` over its rows of the dataset, written as ``shard-<s>.faiss``."""
    import faiss

    from corpusforge.index.dense import build_shard, shard_file

    template_index = faiss.deserialize_index(np.frombuffer(template, dtype=np.uint8))
    idx, probe = build_shard(template_index, DatasetVectors(embeddings), lo, hi, queries, k, DenseIndexConfig(**cfg))
    faiss.write_index(idx, str(Path(out) / shard_file(s)))
    return probe


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

    from corpusforge.index.dense import BuildPlan, DenseIndex

    rx.connect(execution)
    t0 = time.perf_counter()
    source = DatasetVectors(embeddings)
    plan = BuildPlan.make(source, cfg)  # the local engine's plan: same sample, same template, same probe
    template_ref = ray.put(faiss.serialize_index(plan.template).tobytes())
    queries_ref = ray.put(plan.queries)
    build = ray.remote(num_cpus=1)(_build_shard)
    with datasets.atomic_dir(out) as tmp:
        probes = ray.get([build.remote(s, int(plan.offsets[s]), int(plan.offsets[s + 1]), str(embeddings),
                                       template_ref, cfg.model_dump(mode="json"), queries_ref, plan.k, str(tmp))
                          for s in range(cfg.shards)])
        index = DenseIndex.assemble(tmp, plan, probes, cfg, time.perf_counter() - t0)
    return index, source.n
