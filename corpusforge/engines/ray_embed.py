"""embed on Ray: an actor pool encodes what the embedding cache lacks; tasks assemble the dataset.

1. One probe task, on the resources an encoder actor gets, reports the encoder's fingerprint
   (it covers the precision, so it is the workers' device that counts, not the driver's).
2. The driver streams the chunks' text hashes, asks the cache which are there (its hash column
   only), and writes the distinct missing texts, in first-occurrence order, as blocks of
   ``execution.embed_block_texts`` texts, cut at the local engine's window boundaries
   (`embed.WINDOW_ROWS` chunks): at the default, exactly the blocks the local engine encodes, so
   every text is encoded in the same batch and its vector is bitwise the local engine's (padding
   differs with the batch, and changes the last bits). The driver holds one text hash per chunk
   (32 hex characters) in a polars column, then one bool a chunk and one window of texts: planning
   1M chunks peaks at 185 MB over the driver's baseline (283 MB with a Python string a chunk).
3. An actor pool (one actor per GPU with fp16 where the cluster has GPUs, CPU actors otherwise)
   encodes block after block into the shared cache (`embed.EmbeddingCache`, crash-safe shards).
   An actor lost with its node is restarted by Ray Data and its block encoded again; shards it
   had committed stay valid (a text stored twice is tolerated by lookups).
4. One task per chunk unit reads its vectors back from the cache and writes its part of the
   ``embeddings`` dataset, in chunk order.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from corpusforge.engines import ray as rx
from corpusforge.spec import ModelConfig
from corpusforge.stages import StageContext
from corpusforge.stages.checks import enforce

TODO_SCHEMA = pa.schema([pa.field("text_hash", pa.string(), nullable=False),
                         pa.field("text", pa.string(), nullable=False)])


def _actor_resources(cfg) -> tuple[int, float, float]:
    """(actors, cpus each, gpus each): one actor per GPU when there are GPUs, else per CPU (max 8)."""
    res = rx.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus:
        return cfg.embed_actors or gpus, 1, 1
    return cfg.embed_actors or max(1, min(8, int(res.get("CPU", 1)))), 1, 0


def _probe(model: dict) -> dict[str, Any]:
    """The encoder's fingerprint, dim and report, as a worker builds it."""
    from corpusforge.encoding.encoder import Encoder

    enc = Encoder(ModelConfig(**model))
    return {"fingerprint": enc.fingerprint, "dim": enc.dim, "report": enc.report()}


class _EncodeWorker:
    """An actor of the encoder pool: one model, block after block into the cache."""

    def __init__(self, model: dict, cache_dir: str):
        from corpusforge.encoding.embed import EmbeddingCache
        from corpusforge.encoding.encoder import Encoder

        self.encoder = Encoder(ModelConfig(**model))
        self.cache = EmbeddingCache(cache_dir, self.encoder.fingerprint, self.encoder.dim)

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        table = pq.read_table(item["block"])
        hashes = table.column("text_hash").to_pylist()
        texts = table.column("text").to_pylist()
        started = time.perf_counter()
        shards = self.cache.shards_written
        for positions, vectors in self.encoder.iter_encode(texts):
            self.cache.add([hashes[p] for p in positions], vectors)
        self.cache.flush()
        return {"texts": len(texts), "seconds": time.perf_counter() - started,
                "shards": self.cache.shards_written - shards}


def _assemble_unit(item: dict[str, Any]) -> dict[str, Any]:
    """One chunk unit's rows of the embeddings dataset, vectors read from the cache."""
    from corpusforge.encoding.embed import EmbeddingCache, _vectors_array
    from corpusforge.data.hashing import text_hash
    from corpusforge.data.schemas import embeddings_schema

    table = rx.read_unit(rx.Unit(item["unit"], item["file"], item["start"], item["stop"]), ["chunk_id", "text"])
    hashes = [text_hash(t) for t in table.column("text").to_pylist()]
    cache = EmbeddingCache(item["cache_dir"], item["fingerprint"], item["dim"])
    found, vectors = cache.lookup(hashes)
    slot = {h: i for i, h in enumerate(found)}
    missing = [h for h in hashes if h not in slot]
    if missing:
        raise RuntimeError(f"embedding cache {cache.dir} lacks {len(missing)} vectors after encoding "
                           f"(first {missing[0]})")
    rows = np.fromiter((slot[h] for h in hashes), dtype=np.int64, count=len(hashes))
    schema = embeddings_schema(item["dim"])
    out = pa.Table.from_arrays([table.column("chunk_id").combine_chunks(), _vectors_array(vectors[rows])]
                               if len(rows) else [pa.array([], pa.string()), pa.array([], schema.field("vector").type)],
                               schema=schema)
    return {"rows": rx.write_part(item["out"], item["unit"], out, schema)}


def embed(ctx: StageContext, model: ModelConfig, dataset: str) -> dict[str, Any]:
    """The embed stage on Ray (see the module docstring).

    Args:
        ctx: the stage context.
        model: the encoder configuration.
        dataset: the embeddings dataset to write.

    Returns:
        The local engine's summary keys (rows, embedded, cached, duplicates, dim, ...).
    """
    import ray

    from corpusforge.encoding.embed import EmbeddingCache
    from corpusforge.data.schemas import embeddings_schema

    start = time.perf_counter()
    rx.connect(ctx.spec.execution)
    chunks = ctx.ws.dataset("chunks")
    actors, cpus, gpus = _actor_resources(ctx.spec.execution)
    info = ray.get(ray.remote(num_cpus=cpus, num_gpus=gpus)(_probe).remote(model.model_dump(mode="json")))
    fingerprint, dim = info["fingerprint"], info["dim"]
    cache = EmbeddingCache(ctx.ws.embedding_cache, fingerprint, dim)

    scratch = ctx.ws.base / "ray-scratch" / dataset
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        blocks, counts = write_blocks(chunks, cache, scratch, ctx.spec.execution.embed_block_texts)
        rows, cached_rows, todo = counts["rows"], counts["cached"], counts["todo"]
        encode_started = time.perf_counter()
        encoded = rx.map_units(None, [{"block": str(b)} for b in blocks], actors=_EncodeWorker,
                               actor_args=(model.model_dump(mode="json"), str(ctx.ws.embedding_cache)),
                               concurrency=actors, num_cpus=cpus, num_gpus=gpus)
        encode_seconds = time.perf_counter() - encode_started
        out = rx.StagedDataset(ctx.ws.dataset(dataset), embeddings_schema(dim))
        units = rx.plan_units(chunks, ctx.spec.execution.rows_per_task)
        try:
            rx.map_units(_assemble_unit, [{**u.as_dict(), "unit": u.index, "out": str(out.tmp),
                                           "cache_dir": str(ctx.ws.embedding_cache), "fingerprint": fingerprint,
                                           "dim": dim} for u in units])
            out.commit({"stage": "embed", "model_fingerprint": fingerprint, "dim": dim, "encoder": info["report"],
                        "engine": "ray"})
        except BaseException:
            out.abort()
            raise
    finally:
        rx.remove_scratch(scratch)
    enforce(ctx.spec, ctx.ws, [dataset])
    seconds = time.perf_counter() - start
    return {
        "rows": rows,
        "embedded": todo,
        "cached": cached_rows,
        "duplicates": rows - cached_rows - todo,
        "dim": dim,
        "model_fingerprint": fingerprint,
        "seconds": round(seconds, 3),
        "chunks_per_s": round(rows / seconds, 1) if seconds > 0 else 0.0,
        "embed_per_s": round(todo / encode_seconds, 1) if todo and encode_seconds > 0 else None,
        "cache_shards_written": sum(e["shards"] for e in encoded),
        "cache_dir": str(cache.dir),
        "device": info["report"]["device"],
        "precision": info["report"]["precision"],
        "actors": actors,
    }


def _cached_hashes(cache, hashes: pa.Array) -> pa.Array:
    """Which of the distinct `hashes` the cache already holds (reads the shards' hash column only)."""
    import pyarrow.dataset as pads

    files = cache.shards()
    if not files or not len(hashes):
        return pa.array([], pa.string())
    try:
        table = pads.dataset([str(f) for f in files], schema=cache.schema, format="parquet").to_table(
            columns=["text_hash"], filter=pads.field("text_hash").isin(hashes))
    except (pa.ArrowInvalid, OSError):  # an unreadable shard: the full lookup skips it, texts are re-embedded
        found, _ = cache.lookup(hashes.to_pylist())
        return pa.array(found, pa.string())
    return table.column("text_hash").combine_chunks()


def write_blocks(chunks: Path, cache, scratch: Path, block: int, window_rows: int | None = None
                 ) -> tuple[list[Path], dict[str, int]]:
    """Write the texts the cache lacks as Parquet blocks, exactly as the local engine would encode them.

    The local engine (`embed.embed_chunks`) reads the chunks in windows and encodes, per window, the
    distinct texts that neither the cache nor an earlier window holds, in first-occurrence order,
    `block` at a time. That is: the first occurrences of uncached texts, in blocks cut every `block`
    texts and at every window boundary. Blocks are cut the same way here.

    Args:
        chunks: the committed chunks dataset.
        cache: the `embed.EmbeddingCache` of the encoder.
        scratch: where the block files go.
        block: distinct texts per block (the local engine's `block_size`).
        window_rows: the local engine's window; None is `embed.WINDOW_ROWS`.

    Returns:
        (block files in order, counts: ``rows`` (chunks), ``cached`` (rows whose text the cache held
        before this run), ``todo`` (texts written to blocks)).
    """
    import polars as pl

    from corpusforge.data.hashing import text_hash
    from corpusforge.encoding import embed as local

    # pass 1: one hash per chunk, in a polars column rather than a Python string each; what pass 2
    # needs is one bool a chunk: "a first occurrence the cache lacks"
    hashes = pl.concat([pl.Series([text_hash(t) for t in batch.column(1).to_pylist()], dtype=pl.String)
                        for batch in local._text_batches(chunks, ["chunk_id", "text"])]
                       or [pl.Series([], dtype=pl.String)])
    first = hashes.is_first_distinct()
    held = _cached_hashes(cache, hashes.filter(first).to_arrow().cast(pa.string()))
    cached = hashes.is_in(pl.Series(held, dtype=pl.String).implode())
    rows, cached_rows = len(hashes), int(cached.sum())
    todo = (first & ~cached).to_numpy()
    del hashes, first, cached

    blocks: list[Path] = []

    def flush(texts: list[str], keys: list[str]) -> None:
        path = scratch / f"block-{len(blocks):06d}.parquet"
        pq.write_table(pa.table({"text_hash": keys, "text": texts}, schema=TODO_SCHEMA), path)
        blocks.append(path)

    # pass 2: the texts of those chunks, window by window as the local engine reads them
    start = 0
    for _, texts in local._windows(chunks, window_rows or local.WINDOW_ROWS):
        picked = [texts[i] for i in np.flatnonzero(todo[start:start + len(texts)])]
        for lo in range(0, len(picked), block):
            part = picked[lo:lo + block]
            flush(part, [text_hash(t) for t in part])
        start += len(texts)
    if start != rows:  # the dataset changed between the two reads
        raise RuntimeError(f"chunks dataset {chunks} changed while embed planned its blocks ({rows} rows, then {start})")
    return blocks, {"rows": rows, "cached": cached_rows, "todo": int(todo.sum())}
