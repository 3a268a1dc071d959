"""The model stages: embed chunks and build the indexes, for the spec's model and the trained one.

Both stages stream. `index` reads the vectors from the embeddings dataset block by block
(`corpusforge.index.vectors`): it holds the training sample, one block and the shard being built
(the shard is the index: an IVF-PQ shard holds its codes, a Flat or HNSW shard its vectors), and
writes each shard as it is done. BM25 takes two passes over the chunks (statistics per part,
merged, then scores per part written straight into the score matrix's files), so neither the
corpus's texts nor the matrix are held whole; the merged vocabulary is. With
``execution.engine: ray`` embed and the dense index run on Ray (`corpusforge.engines.ray_embed`,
`corpusforge.engines.ray_index`), each shard in its own task. The query tower, when enabled,
reads every chunk text (its distillation set).
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from corpusforge.data import datasets
from corpusforge.engines import uses_ray
from corpusforge.spec import ModelConfig
from corpusforge.stages import StageContext
from corpusforge.stages.checks import enforce


def embed(ctx: StageContext) -> dict[str, Any]:
    """Embed ``chunks`` with the spec's model into ``embeddings`` (through the shared cache)."""
    return _embed(ctx, ctx.spec.model, "embeddings")


def embed_trained(ctx: StageContext) -> dict[str, Any]:
    """Embed ``chunks`` with the trained bi-encoder into ``embeddings_trained``."""
    from corpusforge.stages import retriever

    return _embed(ctx, retriever(ctx.spec, ctx.ws).model, "embeddings_trained")


def _embed(ctx: StageContext, model: ModelConfig, dataset: str) -> dict[str, Any]:
    if uses_ray(ctx.spec):
        from corpusforge.engines import ray_embed

        return ray_embed.embed(ctx, model, dataset)
    from corpusforge.encoding.embed import embed_chunks

    summary = embed_chunks(ctx.ws.dataset("chunks"), ctx.ws.dataset(dataset), ctx.ws.embedding_cache, model,
                           progress=ctx.progress)
    enforce(ctx.spec, ctx.ws, [dataset])
    return summary


def index(ctx: StageContext) -> dict[str, Any]:
    """Build the dense shards and BM25 over ``chunks`` (and distil the query tower when asked)."""
    from corpusforge.index.bm25 import BM25Index

    ws, spec = ctx.ws, ctx.spec
    dense, rows = _dense(ctx, ws.dataset("embeddings"), ws.index_dir / "dense")
    if uses_ray(spec):
        from corpusforge.engines import ray_index

        bm25 = ray_index.bm25(ws.dataset("chunks"), ws.index_dir / "bm25", spec.index.bm25, spec.execution)
    else:
        bm25 = BM25Index.build_in_parts(lambda: _texts(ws.dataset("chunks")), spec.index.bm25, ws.index_dir / "bm25")
    summary = {"rows": rows, "dense": dense.report(), "bm25": bm25.report()}
    tower_dir = ws.index_dir / "query_tower"
    if spec.index.query_tower.enabled:
        from corpusforge.encoding.query_tower import build_query_tower

        texts = datasets.read_table(ws.dataset("chunks"), columns=["text"]).column("text").to_pylist()
        summary["query_tower"] = build_query_tower(spec.model, spec.index.query_tower, texts, tower_dir,
                                                   progress=ctx.progress)
    else:
        shutil.rmtree(tower_dir, ignore_errors=True)  # a snapshot never ships a stale tower
    return summary


def _texts(chunks: Path, rows: int = 65536):
    """The chunk texts in row order, in lists of `rows` (BM25's parts)."""
    for batch in datasets.iter_batches(chunks, batch_size=rows, columns=["text"]):
        yield batch.column("text").to_pylist()


def index_trained(ctx: StageContext) -> dict[str, Any]:
    """Build the dense shards of ``embeddings_trained`` (BM25 is the base build's)."""
    dense, rows = _dense(ctx, ctx.ws.dataset("embeddings_trained"), ctx.ws.trained_index_dir / "dense")
    return {"rows": rows, "dense": dense.report()}


def _dense(ctx: StageContext, embeddings: Path, out: Path):
    built = _build_dense(ctx, embeddings, out)
    # The model behind the vectors, for the snapshot consistency check (`snapshots.consistency`).
    datasets.record_facts(out / "dense.json",
                          {"model_fingerprint": datasets.dataset_info(embeddings).get("model_fingerprint")})
    return built


def _build_dense(ctx: StageContext, embeddings: Path, out: Path):
    _check_in_step(ctx, embeddings)
    if uses_ray(ctx.spec):
        from corpusforge.engines import ray_index

        return ray_index.dense(embeddings, out, ctx.spec.index.dense, ctx.spec.execution)
    from corpusforge.index.dense import DenseIndex
    from corpusforge.index.vectors import DatasetVectors

    source = DatasetVectors(embeddings)
    return DenseIndex.build_from(source, ctx.spec.index.dense, directory=out, progress=ctx.progress), source.n


def _check_in_step(ctx: StageContext, embeddings: Path) -> None:
    """Raise unless the embeddings hold the chunks' ids in the chunks' order (compared batch by batch)."""
    ids = datasets.iter_batches(embeddings, columns=["chunk_id"])
    expected = datasets.iter_batches(ctx.ws.dataset("chunks"), columns=["chunk_id"])
    a = (x for b in ids for x in b.column(0).to_pylist())
    b = (x for b in expected for x in b.column(0).to_pylist())
    sentinel = object()
    for x, y in itertools.zip_longest(a, b, fillvalue=sentinel):
        if x != y:
            raise RuntimeError(f"{embeddings.name} is out of step with chunks; rerun with --force")


def load_vectors(embeddings_path: Path) -> tuple[list[str], np.ndarray]:
    """Read an embeddings dataset into chunk ids and a contiguous float32 matrix (held whole).

    Args:
        embeddings_path: the embeddings dataset directory.

    Returns:
        (chunk ids in dataset order, vectors of shape (n, dim)).
    """
    table = datasets.read_table(embeddings_path)
    col = table.column("vector").combine_chunks()
    dim = col.type.list_size
    vectors = np.ascontiguousarray(col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), dim),
                                   dtype=np.float32)
    return table.column("chunk_id").to_pylist(), vectors
