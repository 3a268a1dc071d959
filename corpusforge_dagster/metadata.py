"""Dagster metadata of a stage's assets: its summary plus Dagster's standard keys.

``dagster/row_count`` and ``dagster/column_schema`` (from the dataset's Arrow schema, as written)
for datasets, ``dagster/uri`` for datasets and the published snapshot, a link to the stage's MLflow
run, and every float rounded to 4 decimals (metrics are not meaningful beyond that).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa

from corpusforge.data import datasets
from corpusforge.data import schemas
from corpusforge.pipeline import Pipeline, StageResult
from corpusforge.stages.checks import dataset_path, row_count

# Where `mlflow ui` serves a local (sqlite / file) store; links to runs of such stores point there.
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"
DIGITS = 4


def rounded(facts: dict[str, Any]) -> dict[str, Any]:
    """Round every float of a flat summary to `DIGITS` decimals (ints, strings and booleans as they are).

    Args:
        facts: e.g. `StageResult.flat`.

    Returns:
        A copy with rounded floats.
    """
    return {k: round(v, DIGITS) if isinstance(v, float) else v for k, v in facts.items()}


def type_name(t: pa.DataType) -> str:
    """An Arrow type's name without list item field names: ``list<string>``, ``list<float>[384]``."""
    if pa.types.is_fixed_size_list(t):
        return f"list<{type_name(t.value_type)}>[{t.list_size}]"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{type_name(t.value_type)}>"
    return str(t)


def table_schema(schema: pa.Schema) -> dg.TableSchema:
    """An Arrow schema as Dagster's table schema (nullability kept).

    Args:
        schema: the Arrow schema.

    Returns:
        The ``dagster/column_schema`` value.
    """
    return dg.TableSchema(columns=[
        dg.TableColumn(f.name, type_name(f.type), constraints=dg.TableColumnConstraints(nullable=f.nullable))
        for f in schema])


def _uri(path: str | Path) -> str:
    text = str(path)
    return text if "://" in text else Path(text).resolve().as_uri()


def dataset_metadata(pipeline: Pipeline, dataset: str) -> dict[str, Any]:
    """Row count, column schema and location of a contract-checked dataset.

    Args:
        pipeline: the pipeline that wrote it.
        dataset: the dataset (asset) name; ``quarantine`` is every stage's quarantine together.

    Returns:
        ``dagster/row_count``, ``dagster/column_schema`` and ``dagster/uri`` (what exists of them).
    """
    ws = pipeline.ws
    out: dict[str, Any] = {}
    rows = row_count(ws, dataset)
    if rows is not None:
        out["dagster/row_count"] = rows
    # the declared contract where there is one (schemas.py), else the schema the dataset was written with
    path = ws.base / "quarantine" if dataset == "quarantine" else dataset_path(ws, dataset)
    schema = schemas.SCHEMAS.get("documents" if dataset == "documents_clean" else dataset)
    if schema is None and datasets.is_complete(path):
        schema = datasets.open_dataset(path).schema
    if schema is not None:
        out["dagster/column_schema"] = table_schema(schema)
    out["dagster/uri"] = dg.MetadataValue.path(_uri(path))
    return out


def snapshot_metadata(result: StageResult) -> dict[str, Any]:
    """The published snapshot's location (``<root>/<index>/<version>``; ``file://`` or ``s3://``).

    Args:
        result: the publish stage's result.

    Returns:
        ``dagster/uri``, or nothing when publish recorded no version.
    """
    s = result.summary
    if not (s.get("root") and s.get("index") and s.get("version")):
        return {}
    root = str(s["root"]).rstrip("/")
    return {"dagster/uri": dg.MetadataValue.path(f"{_uri(root)}/{s['index']}/{s['version']}")}


def mlflow_metadata(result: StageResult, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """A link to the MLflow run the stage was logged to.

    An ``http(s)`` tracking server is linked directly; a local store (sqlite) through
    ``CORPUSFORGE_MLFLOW_UI_URL``, default `DEFAULT_MLFLOW_UI` (``mlflow ui`` on that store).

    Args:
        result: a stage's result from `Pipeline.run_stage_tracked`.
        environ: the environment (default ``os.environ``).

    Returns:
        ``mlflow_run`` (a URL) and ``mlflow_run_id``, or nothing when the stage was not tracked.
    """
    t = result.tracking
    if not t.get("run_id"):
        return {}
    env = os.environ if environ is None else environ
    uri = t.get("tracking_uri") or ""
    base = uri if uri.startswith(("http://", "https://")) else env.get("CORPUSFORGE_MLFLOW_UI_URL") or DEFAULT_MLFLOW_UI
    url = f"{base.rstrip('/')}/#/experiments/{t['experiment_id']}/runs/{t['run_id']}"
    return {"mlflow_run": dg.MetadataValue.url(url), "mlflow_run_id": t["run_id"]}
