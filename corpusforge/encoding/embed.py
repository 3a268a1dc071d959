"""The embed stage: chunks -> embeddings, through a persistent, crash-safe embedding cache.

Every chunk text is looked up in a cache keyed by (encoder fingerprint, `hashing.text_hash`):

```
<cache_dir>/<encoder fingerprint>/shard-<time>-<pid>-<rand>.parquet   (text_hash, vector)
```

Only texts that are not there are embedded, each distinct text once per run however many chunks
carry it. New vectors are appended to the cache in small shards (`shard_size` vectors, 1,024 by
default), each written under a temporary name and renamed into place the moment it is full, so a
run killed at any point loses at most the shard in progress and the next run embeds only what is
missing. The cache directory is shared by every spec of a workspace, so two specs that use the
same model settings never embed the same text twice.

The embeddings dataset is written with `datasets.DatasetWriter` and committed only after every
row has its vector: a crash never leaves a half-visible dataset.

Memory does not grow with the corpus: the chunks are read in windows (`window_rows`, 131,072 by
default) and the stage holds one window's ids, texts, text hashes and vectors (at dim 384 about
200 MB of vectors), each window's embeddings written before the next is read. The cache is never
loaded whole: each window's lookup scans the shards' hash column and reads only the vectors the
window needs (texts a previous window embedded included), so a cache many times larger than the
corpus costs disk, not memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from corpusforge.data import datasets
from corpusforge.encoding.encoder import Encoder
from corpusforge.data.hashing import text_hash
from corpusforge.data.schemas import embeddings_schema
from corpusforge.spec import ModelConfig

log = logging.getLogger("corpusforge.encoding.embed")

SHARD_GLOB = "shard-*.parquet"
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 24 * 3600


def cache_schema(dim: int) -> pa.Schema:
    """Schema of an embedding-cache shard.

    Args:
        dim: the vector dimension.

    Returns:
        ``text_hash`` (string) and ``vector`` (fixed-size float32 list).
    """
    return pa.schema([
        pa.field("text_hash", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
    ], metadata={"dataset": "embedding_cache", "dim": str(dim)})


def _vectors_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """A (n, dim) float32 matrix as an Arrow fixed-size-list column, without a copy per row."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def _vectors_numpy(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """An Arrow fixed-size-list column as a (n, dim) float32 matrix."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], type=pa.list_(pa.float32(), dim))
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


class EmbeddingCache:
    """Vectors of one encoder, keyed by text hash, stored as append-only Parquet shards.

    Args:
        root: the cache root shared across specs (``<workspace>/cache/embeddings``).
        fingerprint: the encoder's fingerprint; its vectors live under ``root/fingerprint``.
        dim: the vector dimension.
        shard_size: new vectors buffered before a shard is committed (smaller: less work lost
            on a crash, more files).

    Shards are immutable once renamed into place; several processes may add to the same cache
    at once (a text embedded by two of them is stored twice, which lookups tolerate).
    """

    def __init__(self, root: str | Path, fingerprint: str, dim: int, shard_size: int = 1024):
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        self.dir = Path(root) / fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self.shard_size = shard_size
        self.schema = cache_schema(dim)
        self.shards_written = 0
        self._hashes: list[str] = []
        self._vectors: list[np.ndarray] = []
        self._buffered = 0
        self._remove_stale_temps()

    def shards(self) -> list[Path]:
        """The committed shard files, oldest first."""
        return sorted(self.dir.glob(SHARD_GLOB))

    def lookup(self, hashes: Iterable[str]) -> tuple[list[str], np.ndarray]:
        """Find cached vectors for some text hashes.

        Args:
            hashes: the text hashes wanted (duplicates allowed).

        Returns:
            ``(found, vectors)``: the distinct hashes that are cached and their vectors, row for
            row. Unreadable shards are skipped with a warning (their texts are embedded again).
        """
        wanted = pa.array(sorted(set(hashes)), type=pa.string())
        files = self.shards()
        if not files or len(wanted) == 0:
            return [], np.empty((0, self.dim), dtype=np.float32)
        table = self._scan(files, wanted)
        if table.schema.field("vector").type != self.schema.field("vector").type:
            raise ValueError(f"embedding cache {self.dir}: vectors are {table.schema.field('vector').type}, "
                             f"expected {self.schema.field('vector').type}; the directory holds another model's vectors")
        found = table.column("text_hash").to_pylist()
        vectors = _vectors_numpy(table.column("vector"), self.dim)
        if len(set(found)) != len(found):  # the same text cached twice (concurrent writers)
            first = {h: i for i, h in reversed(list(enumerate(found)))}
            keep = sorted(first.values())
            found, vectors = [found[i] for i in keep], vectors[keep]
        return found, vectors

    def _scan(self, files: list[Path], wanted: pa.Array) -> pa.Table:
        """Rows of `files` whose hash is in `wanted`; a multi-threaded scan, file by file on error."""
        expr = pads.field("text_hash").isin(wanted)
        try:
            return pads.dataset([str(f) for f in files], schema=self.schema, format="parquet").to_table(filter=expr)
        except (pa.ArrowInvalid, OSError):
            parts = []
            for f in files:
                try:
                    parts.append(pads.dataset(str(f), schema=self.schema, format="parquet").to_table(filter=expr))
                except (pa.ArrowInvalid, OSError) as exc:
                    log.warning("embedding cache: skipping unreadable shard %s (%s)", f, exc)
            return pa.concat_tables(parts) if parts else self.schema.empty_table()

    def add(self, hashes: list[str], vectors: np.ndarray) -> None:
        """Buffer new vectors; commits a shard each time `shard_size` of them are buffered.

        Args:
            hashes: text hashes, one per row of `vectors`.
            vectors: float32 ``(n, dim)``.
        """
        if len(hashes) != len(vectors):
            raise ValueError(f"{len(hashes)} hashes for {len(vectors)} vectors")
        self._hashes.extend(hashes)
        self._vectors.append(np.asarray(vectors, dtype=np.float32))
        self._buffered += len(hashes)
        while self._buffered >= self.shard_size:
            self._commit(self.shard_size)

    def flush(self) -> None:
        """Commit whatever is buffered as a (possibly small) shard."""
        if self._buffered:
            self._commit(self._buffered)

    def _commit(self, n: int) -> None:
        """Write the first `n` buffered vectors to a temp file and rename it into place."""
        vectors = np.concatenate(self._vectors) if len(self._vectors) > 1 else self._vectors[0]
        hashes, rest_hashes = self._hashes[:n], self._hashes[n:]
        table = pa.Table.from_arrays([pa.array(hashes, type=pa.string()), _vectors_array(vectors[:n])],
                                     schema=self.schema)
        tmp = self.dir / f"{_TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        final = self.dir / f"shard-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        # Vectors barely compress; no codec keeps reads at memory speed.
        pq.write_table(table, tmp, compression="none")
        with open(tmp, "rb") as f:  # durable before visible: a power cut cannot expose a torn shard
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self.shards_written += 1
        self._hashes = rest_hashes
        self._vectors = [vectors[n:]] if len(rest_hashes) else []
        self._buffered = len(rest_hashes)

    def _remove_stale_temps(self) -> None:
        """Delete temp shards left by dead writers on this host (or any writer, after a day)."""
        host = socket.gethostname()
        now = time.time()
        for tmp in self.dir.glob(f"{_TMP_PREFIX}*"):
            try:
                owner_host, pid = tmp.name[len(_TMP_PREFIX):].rsplit("-", 2)[:2]
                dead = owner_host == host and not _pid_alive(int(pid))
                if dead or now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                    tmp.unlink(missing_ok=True)
            except (ValueError, OSError):
                continue


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _text_batches(chunks_path: Path, columns: list[str], batch_size: int = 4096) -> Iterable[pa.RecordBatch]:
    """Record batches of a chunks dataset, with clear errors for a missing dataset or column."""
    if not datasets.is_complete(chunks_path):
        raise FileNotFoundError(f"chunks dataset {chunks_path} is missing or incomplete (no {datasets.MARKER}); "
                                "run the chunk stage first")
    names = datasets.open_dataset(chunks_path).schema.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"chunks dataset {chunks_path} lacks column(s) {', '.join(missing)} "
                         f"(has {', '.join(names)})")
    for batch in datasets.iter_batches(chunks_path, batch_size=batch_size, columns=columns):
        if batch.column(columns.index("text")).null_count:
            bad = batch.filter(batch.column(columns.index("text")).is_null()).column(0)[0].as_py()
            raise ValueError(f"chunks dataset {chunks_path}: chunk {bad!r} has no text (null)")
        yield batch


def _windows(chunks_path: Path, rows: int) -> Iterable[tuple[pa.Array, list[str]]]:
    """``(chunk ids, texts)`` of a chunks dataset in dataset order, at least `rows` at a time (less
    at the end)."""
    batches: list[pa.RecordBatch] = []
    held = 0
    for batch in _text_batches(chunks_path, ["chunk_id", "text"], batch_size=min(rows, 4096)):
        batches.append(batch)
        held += batch.num_rows
        if held >= rows:
            yield _window(batches)
            batches, held = [], 0
    if held:
        yield _window(batches)


def _window(batches: list[pa.RecordBatch]) -> tuple[pa.Array, list[str]]:
    table = pa.Table.from_batches(batches)
    return table.column("chunk_id").combine_chunks(), table.column("text").to_pylist()


# Chunks read, looked up and written together; the Ray engine cuts its encoding blocks at the same
# window boundaries (`engines.ray_embed`), so both encode every text in the same batch.
WINDOW_ROWS = 131_072
# Distinct texts tokenised, length-sorted and encoded together: the batches, so the last bits of the
# vectors, depend on which texts share a block.
BLOCK_TEXTS = 16_384


def embed_chunks(chunks_path: str | Path, out_path: str | Path, cache_dir: str | Path, cfg: ModelConfig,
                 progress: bool = True, *, encoder: Encoder | None = None, shard_size: int = 1024,
                 block_size: int = BLOCK_TEXTS, window_rows: int | None = None) -> dict[str, Any]:
    """Embed a chunks dataset into an embeddings dataset, reusing and extending the cache.

    Args:
        chunks_path: a committed chunks dataset (columns ``chunk_id`` and ``text``).
        out_path: where the embeddings dataset (`schemas.embeddings_schema`) is committed; one
            row per chunk, in the chunks dataset's order.
        cache_dir: the cache root shared across specs; vectors go to ``cache_dir/<fingerprint>/``.
        cfg: the model section of the spec.
        progress: show a rich progress bar (counts and chunks/s) while embedding.
        encoder: an already loaded encoder for `cfg` (saves reloading the model).
        shard_size: new vectors per committed cache shard.
        block_size: texts tokenised and length-sorted together (bounds tokenisation memory).
        window_rows: chunks read, looked up and written together (bounds the stage's memory);
            None is `WINDOW_ROWS`.

    Returns:
        ``rows``, ``embedded`` (distinct texts encoded now), ``cached`` (rows whose vector was in
        the cache when their window was read: from earlier runs, or from an earlier window of
        this one), ``duplicates`` (rows repeating a text encoded in their own window), ``dim``,
        ``model_fingerprint`` (the encoder fingerprint that keys the cache), ``seconds``,
        ``chunks_per_s``, ``embed_per_s`` (texts encoded per second of encoding),
        ``cache_shards_written``, ``cache_dir`` and ``device``.

    Raises:
        FileNotFoundError: the chunks dataset is missing or not committed.
        ValueError: a required column is missing, a text is null, or `encoder` was built for
            another config.
    """
    start = time.perf_counter()
    chunks_path, out_path = Path(chunks_path), Path(out_path)
    if encoder is None:
        encoder = Encoder(cfg)
    elif encoder.cfg != cfg:
        raise ValueError(f"encoder was built for {encoder.cfg!r}, not {cfg!r}")
    cache = EmbeddingCache(cache_dir, encoder.fingerprint, encoder.dim, shard_size)
    counts = {"rows": 0, "embedded": 0, "cached": 0}
    embed_seconds = 0.0
    info = {"stage": "embed", "model_fingerprint": encoder.fingerprint, "dim": encoder.dim,
            "encoder": encoder.report()}
    bar = None
    if progress:
        from corpusforge.progress import make_progress

        bar = make_progress()
    with bar if bar is not None else contextlib.nullcontext(), \
            datasets.DatasetWriter(out_path, embeddings_schema(encoder.dim)) as writer:
        task = None
        for chunk_ids, texts in _windows(chunks_path, window_rows or WINDOW_ROWS):
            if bar is not None and task is None:
                task = bar.add_task("embed", total=datasets.count_rows(chunks_path), unit="chunks")
            hashes = [text_hash(t) for t in texts]
            found, found_vectors = cache.lookup(hashes)
            slot = {h: i for i, h in enumerate(found)}
            todo: dict[str, str] = {}
            for h, text in zip(hashes, texts):
                if h not in slot and h not in todo:
                    todo[h] = text
            if bar is not None:  # rows served without encoding: cached, or a repeat of a text encoded below
                bar.advance(task, len(hashes) - len(todo))
            store = np.empty((len(found) + len(todo), encoder.dim), dtype=np.float32)
            store[:len(found)] = found_vectors
            advance = (lambda n: bar.advance(task, n)) if bar is not None else (lambda n: None)
            embed_seconds += _embed_missing(encoder, cache, todo, store, slot, advance, block_size)
            rows = np.fromiter((slot[h] for h in hashes), dtype=np.int64, count=len(hashes))
            for lo in range(0, len(rows), 8192):
                part = rows[lo:lo + 8192]
                writer.write_table(pa.Table.from_arrays([chunk_ids[lo:lo + 8192], _vectors_array(store[part])],
                                                        schema=writer.schema))
            counts["rows"] += len(hashes)
            counts["embedded"] += len(todo)
            counts["cached"] += sum(1 for h in hashes if h in slot and slot[h] < len(found))
        writer.commit(info)

    seconds = time.perf_counter() - start
    return {
        **counts,
        "duplicates": counts["rows"] - counts["cached"] - counts["embedded"],
        "dim": encoder.dim,
        "model_fingerprint": encoder.fingerprint,
        "seconds": round(seconds, 3),
        "chunks_per_s": round(counts["rows"] / seconds, 1) if seconds > 0 else 0.0,
        "embed_per_s": round(counts["embedded"] / embed_seconds, 1) if embed_seconds > 0 else None,
        "cache_shards_written": cache.shards_written,
        "cache_dir": str(cache.dir),
        "device": str(encoder.device),
        # what `model.precision: auto` became here: bf16 on CPUs with native bf16, fp32 on others, and
        # the vectors (so the metrics) differ in the last bits between the two
        "precision": encoder.report()["precision"],
    }


def _embed_missing(encoder: Encoder, cache: EmbeddingCache, todo: dict[str, str], store: np.ndarray,
                   slot: dict[str, int], advance, block_size: int) -> float:
    """Encode `todo` (hash -> text) into `store` after the cached rows, committing cache shards.

    Args:
        advance: called with the number of texts each encoded batch adds (the progress bar).

    Returns:
        Seconds spent encoding.
    """
    if not todo:
        return 0.0
    begin = time.perf_counter()
    base = len(slot)
    todo_hashes = list(todo)
    for lo in range(0, len(todo_hashes), block_size):
        block = todo_hashes[lo:lo + block_size]
        for positions, vectors in encoder.iter_encode([todo[h] for h in block]):
            store[base + lo + positions] = vectors
            cache.add([block[p] for p in positions], vectors)
            advance(len(positions))
    cache.flush()  # the next window's lookup finds this window's texts
    for i, h in enumerate(todo_hashes):
        slot[h] = base + i
    return time.perf_counter() - begin
