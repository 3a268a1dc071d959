"""Parquet datasets on local disk: streamed writes in row groups, atomic publication, reads.

A dataset is a directory of `part-NNNNN.parquet` files plus `_dataset.json` (row count, schema
name, and whatever the writer recorded). It is written under a temporary sibling name and
renamed into place on commit, so readers never see a half-written dataset and a crash leaves
only a temporary directory that the next run removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

MARKER = "_dataset.json"
# The key under which an output (a dataset's marker, an index's JSON) records the fingerprint of
# the stage run that built it; a stage is skipped only when every output carries its fingerprint.
FINGERPRINT_KEY = "stage_fingerprint"


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place, replacing any previous version.

    Args:
        tmp: the finished directory (same filesystem as `final`).
        final: the destination.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)


def remove_stale_temps(final: Path) -> None:
    """Delete temporary siblings left by a crashed writer of `final`."""
    if not final.parent.exists():
        return
    for p in final.parent.glob(f".{final.name}.*"):
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Write a directory all at once: yields an empty temporary sibling that replaces `final`
    when the block succeeds and is deleted when it raises (or when a later run finds it left
    behind by a killed process).

    Args:
        final: the directory to produce.

    Yields:
        The temporary directory to fill.
    """
    final = Path(final)
    remove_stale_temps(final)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class DatasetWriter:
    """Streams rows into a Parquet dataset and publishes it atomically.

    Args:
        path: the final dataset directory.
        schema: the Arrow schema every row must match.
        rows_per_group: rows buffered before a row group is flushed (memory stays flat).
        rows_per_file: rows per part file.

    Use as a context manager; `commit()` publishes, leaving the block without it discards.
    """

    def __init__(self, path: str | Path, schema: pa.Schema, rows_per_group: int = 4096,
                 rows_per_file: int = 500_000):
        self.path = Path(path)
        self.schema = schema
        self.rows_per_group = rows_per_group
        self.rows_per_file = rows_per_file
        remove_stale_temps(self.path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.tmp.mkdir(parents=True)
        self.rows = 0
        self._buffer: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0
        self._files = 0
        self._committed = False

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()

    def write_rows(self, rows: Iterable[dict]) -> None:
        """Buffer rows (dicts keyed by field name); flushes a row group when the buffer is full."""
        for row in rows:
            self._buffer.append(row)
            if len(self._buffer) >= self.rows_per_group:
                self._flush()

    def write_table(self, table: pa.Table | pa.RecordBatch) -> None:
        """Write an Arrow table or batch that already has this writer's schema."""
        self._flush()
        table = pa.Table.from_batches([table]) if isinstance(table, pa.RecordBatch) else table
        self._write(table.cast(self.schema))

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        self._buffer = []
        self._write(table)

    def _write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self._writer is None or self._file_rows >= self.rows_per_file:
            self._close_file()
            name = self.tmp / f"part-{self._files:05d}.parquet"
            self._writer = pq.ParquetWriter(name, self.schema, compression="zstd")
            self._files += 1
        self._writer.write_table(table, row_group_size=self.rows_per_group)
        self._file_rows += table.num_rows
        self.rows += table.num_rows

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._file_rows = 0

    def commit(self, info: dict[str, Any] | None = None) -> Path:
        """Flush, write the marker and rename the dataset into place.

        Args:
            info: extra JSON-serialisable facts to record in `_dataset.json`.

        Returns:
            The final dataset path.
        """
        self._flush()
        self._close_file()
        if self._files == 0:  # an empty dataset still has a readable (empty) part with the schema
            pq.write_table(self.schema.empty_table(), self.tmp / "part-00000.parquet")
        marker = {"rows": self.rows, "dataset": (self.schema.metadata or {}).get(b"dataset", b"").decode()}
        marker.update(info or {})
        (self.tmp / MARKER).write_text(json.dumps(marker, indent=2, default=str))
        replace_dir(self.tmp, self.path)
        self._committed = True
        return self.path

    def abort(self) -> None:
        """Discard everything written so far."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def is_complete(path: str | Path) -> bool:
    """True when `path` is a committed dataset."""
    return (Path(path) / MARKER).exists()


def dataset_info(path: str | Path) -> dict[str, Any]:
    """The `_dataset.json` facts of a committed dataset."""
    return json.loads((Path(path) / MARKER).read_text())


def recorded_fingerprint(path: str | Path) -> str | None:
    """The stage fingerprint an output records: a dataset's in its marker, a JSON file's in itself.

    Args:
        path: a dataset directory or a JSON file (``dense.json``, ``bm25.json``...).

    Returns:
        The recorded fingerprint, or None when the output is missing, incomplete, unreadable or
        records none.
    """
    path = Path(path)
    meta = path / MARKER if path.suffix == "" else path
    try:
        value = json.loads(meta.read_text()).get(FINGERPRINT_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def record_fingerprint(path: str | Path, fingerprint: str) -> None:
    """Record a stage fingerprint in an output (see `record_facts`).

    Args:
        path: a committed dataset directory (recorded in its marker) or a JSON file holding an object.
        fingerprint: the fingerprint of the stage run that built it.
    """
    record_facts(path, {FINGERPRINT_KEY: fingerprint})


def record_facts(path: str | Path, facts: dict[str, Any]) -> None:
    """Add facts to an output's JSON, atomically (temp file + rename: a new inode, so a published
    snapshot hard-linking the old file keeps it unchanged).

    Args:
        path: a committed dataset directory (recorded in its marker) or a JSON file holding an object.
        facts: JSON-serialisable keys and values to set.
    """
    path = Path(path)
    meta = path / MARKER if path.suffix == "" else path
    data = {**json.loads(meta.read_text()), **facts}
    for stale in meta.parent.glob(f".{meta.name}.tmp-*"):  # left by a writer killed right here
        stale.unlink(missing_ok=True)
    tmp = meta.with_name(f".{meta.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, meta)


def open_dataset(path: str | Path) -> pads.Dataset:
    """Open a committed dataset for scanning (lazy, memory-mapped Parquet)."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete dataset (no {MARKER})")
    return pads.dataset(sorted(str(p) for p in path.glob("part-*.parquet")), format="parquet")


def iter_batches(path: str | Path, batch_size: int = 4096, columns: list[str] | None = None
                 ) -> Iterator[pa.RecordBatch]:
    """Stream a dataset as record batches, in write order.

    Reads file by file, row group by row group, in the caller's thread: nothing is read ahead of
    the consumer. (Arrow's dataset scanner reads ahead on its own threads, and the slower the
    consumer, the further: with a tokenizer or a contract check consuming, it held a gigabyte of
    batches of a 3M-row dataset.)

    Args:
        path: a committed dataset directory.
        batch_size: rows per batch at most (a batch never spans two row groups).
        columns: the columns to read (default: all).

    Yields:
        Record batches in the order the rows were written.
    """
    for file in open_dataset(path).files:
        with contextlib.closing(pq.ParquetFile(file)) as parquet:
            yield from parquet.iter_batches(batch_size=batch_size, columns=columns, use_threads=False)


def iter_rows(path: str | Path, batch_size: int = 4096, columns: list[str] | None = None
              ) -> Iterator[dict]:
    """Stream a dataset as row dicts, in write order."""
    for batch in iter_batches(path, batch_size, columns):
        yield from batch.to_pylist()


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a whole dataset into memory."""
    return open_dataset(path).to_table(columns=columns)


def count_rows(path: str | Path) -> int:
    """Row count of a committed dataset."""
    return open_dataset(path).count_rows()
