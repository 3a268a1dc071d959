"""Where a dense build reads its vectors from: a matrix in memory, or an embeddings dataset by row range.

A dense build (`corpusforge.index.dense`) reads its input twice, never whole: the training sample and
the recall probe's queries (`gather`, sorted row numbers), then each shard in blocks (`read`). Both
engines build from a `DatasetVectors`, so the local engine holds one block of vectors at a time
(plus the index being built), as a Ray shard task does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class VectorSource(Protocol):
    """Rows ``0..n-1`` of ``dim``-dimensional vectors, readable by range."""

    n: int
    dim: int

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` as a float32 ``(hi - lo, dim)`` matrix."""

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of sorted row numbers `rows`, as a float32 ``(len(rows), dim)`` matrix."""


class ArrayVectors:
    """A matrix already in memory (the Python API's `DenseIndex.build`).

    Args:
        vectors: a 2-D array; rows are returned as float32 views or copies.
    """

    def __init__(self, vectors: np.ndarray):
        self.x = vectors
        self.n, self.dim = vectors.shape

    def read(self, lo: int, hi: int) -> np.ndarray:
        return self.x[lo:hi]

    def gather(self, rows: np.ndarray) -> np.ndarray:
        return self.x[rows] if len(rows) < self.n else self.x


class DatasetVectors:
    """The ``vector`` column of an embeddings dataset, read a row group at a time.

    Args:
        path: the dataset directory (``part-*.parquet``, rows in file-name order).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = sorted(self.path.glob("part-*.parquet"))
        # (file, first row of each of its row groups, and the end): row ranges without reading data
        self._groups: list[tuple[Path, np.ndarray]] = []
        offset, dim = 0, None
        for f in self.files:
            meta = pq.ParquetFile(f).metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self._groups.append((f, offset + np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])))
            offset += meta.num_rows
            if dim is None:
                dim = pq.read_schema(f).field("vector").type.list_size
        self.n = int(offset)
        self.dim = int(dim or 0)

    def _matrix(self, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        flat = column.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(column), self.dim).astype(np.float32, copy=False)

    def _read_groups(self, f: Path, groups: list[int]) -> pa.ChunkedArray:
        return pq.ParquetFile(f).read_row_groups(groups, columns=["vector"]).column("vector")

    def read(self, lo: int, hi: int) -> np.ndarray:
        out = np.empty((max(hi - lo, 0), self.dim), dtype=np.float32)
        for f, bounds in self._groups:
            a, b = max(lo, int(bounds[0])), min(hi, int(bounds[-1]))
            if a >= b:
                continue
            first = int(np.searchsorted(bounds, a, side="right")) - 1
            last = int(np.searchsorted(bounds, b, side="left"))  # one past the last group overlapping
            col = self._read_groups(f, list(range(first, last)))
            start = a - int(bounds[first])
            out[a - lo:b - lo] = self._matrix(col.slice(start, b - a))
        return out

    def gather(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        at = 0
        for f, bounds in self._groups:
            for g in range(len(bounds) - 1):
                j = int(np.searchsorted(rows, bounds[g + 1]))
                if j > at:
                    col = self._read_groups(f, [g]).combine_chunks()
                    out[at:j] = self._matrix(col.take(pa.array(rows[at:j] - bounds[g])))
                    at = j
        return out
