"""Ray plumbing shared by the distributed stages.

- `connect`: join the spec's cluster (``execution.address``) or start a local Ray.
- `plan_units`: split a committed dataset into tasks of about ``rows_per_task`` rows (slices of
  its Parquet files); a task's output file is named after its unit, so the files of a dataset
  written on Ray, read in name order, hold the rows in the order the local engine writes them.
- `StagedDataset`: a dataset written by many tasks into one temporary directory and committed by
  the driver with the same marker and atomic rename as `datasets.DatasetWriter`.
- `map_units`: run one function per unit through Ray Data's streaming executor.
- `KeyPartitions`: find keys (ids, content hashes, MinHash bands) shared by rows of different
  tasks: every task writes ``(key, order)`` pairs into hash partitions, one task per partition
  reports the keys seen more than once. Only the rows involved in a collision ever reach the
  driver, which is how the dedup decisions stay exactly those of the local, sequential engine.

Every task reads and writes the workspace by path, so on a multi-node cluster the workspace must
be on storage every node mounts at the same path (NFS, a CSI volume, ...); see docs/scale.md.
Nothing here imports ray at module level: the core library stays importable without it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from hashlib import blake2b
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from corpusforge.data import datasets
from corpusforge.spec import ExecutionConfig

log = logging.getLogger("corpusforge.ray")

PART = "part-{:05d}.parquet"
ROW_GROUP = 4096
ORDER_SHIFT = 32  # order key = unit << 32 | position: global write order, whatever the partitioning


def connect(cfg: ExecutionConfig) -> None:
    """Make sure this process is a Ray driver: reuse a running connection, else join or start one.

    Args:
        cfg: the spec's execution section. ``address`` joins a cluster (``auto``, ``host:port``
            or ``ray://host:10001``); none starts a local Ray with ``num_cpus`` and
            ``object_store_mb``.
    """
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    if cfg.address:
        ray.init(address=cfg.address, runtime_env=runtime_env, log_to_driver=False)
    else:
        store = cfg.object_store_mb * 1024 * 1024 if cfg.object_store_mb else None
        # address="local": a Ray of our own, never one that another process started on this machine
        ray.init(address="local", num_cpus=cfg.num_cpus, object_store_memory=store, include_dashboard=False,
                 runtime_env=runtime_env, log_to_driver=False)
    _quiet_data_context()


def _quiet_data_context() -> None:
    import ray.data

    # Ray Data logs every dataset's plan and progress at INFO: the stage logs its own summary
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.verbose_progress = False


def cluster_resources() -> dict[str, float]:
    """The cluster's total resources (CPU, GPU, memory, ...)."""
    import ray

    return dict(ray.cluster_resources())


# ------------------------------------------------------------------------------------ units


@dataclass(frozen=True)
class Unit:
    """One task's input: rows ``start:stop`` of one Parquet file (or a whole source file).

    Attributes:
        index: the unit's position; names its output files and orders its rows.
        file: the input file.
        start: first row within the file.
        stop: one past the last row.
    """

    index: int
    file: str
    start: int = 0
    stop: int = -1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_units(path: str | Path, rows_per_task: int) -> list[Unit]:
    """Split a committed dataset into units of at most `rows_per_task` rows, in row order.

    Args:
        path: the dataset directory.
        rows_per_task: the row target of a unit.

    Returns:
        The units; a dataset with no rows gives one empty unit (so outputs keep their schema).
    """
    files = sorted(str(p) for p in Path(path).glob("part-*.parquet"))
    if not datasets.is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete dataset (no {datasets.MARKER})")
    units: list[Unit] = []
    for f in files:
        n = pq.ParquetFile(f).metadata.num_rows
        for lo in range(0, n, rows_per_task):
            units.append(Unit(len(units), f, lo, min(lo + rows_per_task, n)))
    return units or [Unit(0, files[0], 0, 0)]


def read_unit(unit: Unit, columns: list[str] | None = None) -> pa.Table:
    """The rows of a unit (only the row groups it overlaps are read)."""
    pf = pq.ParquetFile(unit.file)
    groups, offset, first = [], 0, None
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset + n > unit.start and offset < unit.stop:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    if not groups:
        return pf.schema_arrow.empty_table().select(columns) if columns else pf.schema_arrow.empty_table()
    table = pf.read_row_groups(groups, columns=columns)
    return table.slice(unit.start - first, unit.stop - unit.start)


def order_keys(unit: int, n: int) -> np.ndarray:
    """The global order keys of a unit's first `n` rows (unit << 32 | position)."""
    return (np.int64(unit) << np.int64(ORDER_SHIFT)) + np.arange(n, dtype=np.int64)


# ------------------------------------------------------------------------- staged outputs


def remove_scratch(path: Path) -> None:
    """Delete a stage's scratch directory, and the scratch root once it is empty."""
    shutil.rmtree(path, ignore_errors=True)
    try:
        path.parent.rmdir()
    except OSError:  # another stage's scratch is still there
        pass


class StagedDataset:
    """A dataset whose part files are written by tasks, then committed by the driver.

    Args:
        final: the dataset directory to produce.
        schema: its Arrow schema.

    Tasks call `write_part` with `tmp` (a path, so it travels to them as a string); the driver
    calls `commit` once every task has succeeded, or `abort`.
    """

    def __init__(self, final: str | Path, schema: pa.Schema):
        self.final = Path(final)
        self.schema = schema
        datasets.remove_stale_temps(self.final)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.tmp.mkdir(parents=True)

    def commit(self, info: dict[str, Any] | None = None) -> int:
        """Write the marker and move the dataset into place.

        Returns:
            Its row count.
        """
        parts = sorted(self.tmp.glob("part-*.parquet"))
        if not parts:  # an empty dataset still has a readable part with the schema
            pq.write_table(self.schema.empty_table(), self.tmp / PART.format(0))
            parts = [self.tmp / PART.format(0)]
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
        marker = {"rows": rows, "dataset": (self.schema.metadata or {}).get(b"dataset", b"").decode()}
        marker.update(info or {})
        (self.tmp / datasets.MARKER).write_text(json.dumps(marker, indent=2, default=str))
        datasets.replace_dir(self.tmp, self.final)
        return rows

    def abort(self) -> None:
        """Discard everything the tasks wrote."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_part(directory: str | Path, unit: int, table: pa.Table, schema: pa.Schema) -> int:
    """Write one task's rows as ``part-<unit>.parquet`` (nothing when there are none).

    Written under a temporary name and renamed, so a retried task replaces, never appends.

    Returns:
        The rows written.
    """
    if table.num_rows == 0:
        return 0
    final = Path(directory) / PART.format(unit)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}")
    pq.write_table(table.cast(schema), tmp, compression="zstd", row_group_size=ROW_GROUP)
    os.replace(tmp, final)
    return table.num_rows


class PartWriter:
    """Streams one task's rows into ``part-<unit>.parquet`` in row groups (memory stays flat).

    Args:
        directory: the staged dataset's temporary directory.
        unit: the task's unit index (names the file).
        schema: the rows' schema.

    The file appears (renamed from a temporary name) on `close`, only when it has rows, so a
    retried task replaces a file rather than appending to it.
    """

    def __init__(self, directory: str | Path, unit: int, schema: pa.Schema):
        self.final = Path(directory) / PART.format(unit)
        self.tmp = self.final.with_name(f".{self.final.name}.{uuid.uuid4().hex[:8]}")
        self.schema = schema
        self.rows = 0
        self._buffer: list[dict] = []
        self._writer: pq.ParquetWriter | None = None

    def write_rows(self, rows: list[dict]) -> None:
        """Buffer rows (dicts keyed by field name), flushing full row groups."""
        self._buffer.extend(rows)
        if len(self._buffer) >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        self._buffer = []
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        self._writer.write_table(table, row_group_size=ROW_GROUP)
        self.rows += table.num_rows

    def close(self) -> int:
        """Flush and publish the file.

        Returns:
            The rows written.
        """
        self._flush()
        if self._writer is not None:
            self._writer.close()
            os.replace(self.tmp, self.final)
        return self.rows


# -------------------------------------------------------------------------------- mapping


def map_units(fn: Callable[[dict[str, Any]], dict[str, Any]], items: list[dict[str, Any]], *,
              actors: type | None = None, actor_args: tuple = (), concurrency: int | None = None,
              num_cpus: float = 1, num_gpus: float = 0) -> list[dict[str, Any]]:
    """Run `fn` once per item on the cluster (Ray Data ``map_batches``, one item per task).

    Args:
        fn: item -> a flat dict of JSON-able results (ignored when `actors` is given).
        items: JSON-able dicts (unit descriptions, paths); small, they travel in the task.
        actors: a class whose instances are called with each item instead of `fn`: an actor
            pool, for work with an expensive setup (a tokenizer, a model).
        actor_args: constructor arguments of `actors`.
        concurrency: the actor pool size (default: one per cluster CPU).
        num_cpus: CPUs each task or actor reserves.
        num_gpus: GPUs each task or actor reserves.

    Returns:
        The results, in item order.
    """
    import ray.data

    if not items:
        return []
    payload = [{"i": i, "item": json.dumps(item)} for i, item in enumerate(items)]
    ds = ray.data.from_items(payload, override_num_blocks=len(payload))
    kwargs: dict[str, Any] = {"batch_size": 1, "num_cpus": num_cpus}
    if num_gpus:
        kwargs["num_gpus"] = num_gpus
    if actors is not None:
        pool = concurrency or max(1, int(cluster_resources().get("CPU", 1)))
        size = min(pool, len(items))
        # min 1: a pool that lost a node's actors goes on with the others while they restart
        strategy = ray.data.ActorPoolStrategy(min_size=1, max_size=size, initial_size=size)
        ds = ds.map_batches(_ActorCall, fn_constructor_args=(actors, actor_args), compute=strategy, **kwargs)
    else:
        ds = ds.map_batches(_call, fn_kwargs={"fn": fn}, **kwargs)
    rows = ds.take_all()
    out = [None] * len(items)
    for row in rows:
        out[int(row["i"])] = json.loads(row["result"])
    return out


def _call(batch: dict[str, Any], fn: Callable) -> dict[str, list]:
    """One Ray Data batch (one item) through a plain function."""
    return {"i": [int(batch["i"][0])], "result": [json.dumps(fn(json.loads(str(batch["item"][0]))))]}


class _ActorCall:
    """One Ray Data batch (one item) through a long-lived object (an actor of the pool)."""

    def __init__(self, cls: type, args: tuple):
        self.obj = cls(*args)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        return {"i": [int(batch["i"][0])], "result": [json.dumps(self.obj(json.loads(str(batch["item"][0]))))]}


# -------------------------------------------------------------------------- key collisions


def key_hash(kind: str, value: bytes | str) -> int:
    """A 63-bit hash of a typed key (``id``, ``hash``, ``band<i>``), stable across processes."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    return int.from_bytes(blake2b(kind.encode() + b"\0" + data, digest_size=8).digest(), "little") >> 1


class KeyPartitions:
    """Hash-partitioned ``(key, order)`` pairs, written by the map tasks, reduced per partition.

    Args:
        root: a scratch directory (removed by `cleanup`).
        partitions: how many partitions (each reduced by one task).
    """

    def __init__(self, root: str | Path, partitions: int):
        self.root = Path(root)
        self.partitions = partitions
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)

    def spec(self) -> dict[str, Any]:
        """What a task needs to write its keys (JSON-able)."""
        return {"root": str(self.root), "partitions": self.partitions}

    @staticmethod
    def write(spec: dict[str, Any], unit: int, keys: np.ndarray, orders: np.ndarray) -> None:
        """Write one task's pairs into the partitions (``p<k>/u<unit>.parquet``)."""
        keys = np.asarray(keys, dtype=np.int64)
        orders = np.asarray(orders, dtype=np.int64)
        part = keys % spec["partitions"]
        for p in np.unique(part):
            sel = part == p
            d = Path(spec["root"]) / f"p{int(p):05d}"
            d.mkdir(exist_ok=True)
            final = d / f"u{unit:06d}.parquet"
            tmp = d / f".u{unit:06d}.{uuid.uuid4().hex[:8]}"
            pq.write_table(pa.table({"key": keys[sel], "order": orders[sel]}), tmp)
            os.replace(tmp, final)

    def collisions(self) -> list[int]:
        """Order keys of every row that shares a key with another row (one task per partition).

        Returns:
            The involved order keys, sorted.
        """
        items = [{"dir": str(self.root / f"p{p:05d}")} for p in range(self.partitions)
                 if (self.root / f"p{p:05d}").exists()]
        found = map_units(_partition_collisions, items)
        return sorted({o for r in found for o in r["orders"]})

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _partition_collisions(item: dict[str, Any]) -> dict[str, Any]:
    """Orders of the rows of one partition whose key occurs in more than one row."""
    files = sorted(Path(item["dir"]).glob("u*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
    if table is None or table.num_rows == 0:
        return {"orders": []}
    keys = table.column("key").to_numpy()
    orders = table.column("order").to_numpy()
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return {"orders": sorted(set(orders[counts[inverse] > 1].tolist()))}
