"""Airflow DAGs: one per pipeline spec (``pipelines/<stem>.yaml`` -> DAG ``corpusforge_<stem>``).

Each DAG is generated from the stage graph (`corpusforge.graph`): one TaskFlow task per stage the
spec runs (the training branch only with ``train.enabled``), wired by the graph's dependencies,
each calling `Pipeline.run_stage_tracked`,
so a rerun skips unchanged stages and each stage is an MLflow run tagged with the Airflow run id.
Task logs show each stage's summary.

Settings come from the environment of the workers (the same names as the Dagster resources):
``CORPUSFORGE_WORKSPACE`` (default: ``workspace/`` in the repository), ``CORPUSFORGE_PIPELINES_DIR``,
``CORPUSFORGE_PUBLISH_ROOT`` / ``CORPUSFORGE_S3_ENDPOINT_URL`` (e.g. publish to S3),
``CORPUSFORGE_MLFLOW_TRACKING_URI``, ``CORPUSFORGE_MLFLOW_EXPERIMENT``, ``CORPUSFORGE_DEVICE``;
``CORPUSFORGE_AIRFLOW_RETRIES`` (default 2) where the DAG file is parsed.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

from airflow.sdk import dag, get_current_context, task

from corpusforge.graph import deps_for, stages_for
from corpusforge.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
PIPELINES_DIR = Path(os.environ.get("CORPUSFORGE_PIPELINES_DIR") or ROOT / "pipelines")
# Retries cover transient failures (S3, MLflow server); CORPUSFORGE_AIRFLOW_RETRIES=0 fails fast (tests).
DEFAULT_ARGS = {"owner": "corpusforge", "retries": int(os.environ.get("CORPUSFORGE_AIRFLOW_RETRIES", "2")),
                "retry_delay": timedelta(minutes=5),
                "retry_exponential_backoff": True, "max_retry_delay": timedelta(minutes=30)}


def run_stage(spec_path: str, stage: str) -> dict:
    """Run one stage of a spec (the body of every task).

    Args:
        spec_path: the spec's YAML file.
        stage: the stage.

    Returns:
        The stage's metadata (counts, metrics, version), pushed as the task's XCom.
    """
    from corpusforge.pipeline import Pipeline
    from corpusforge.spec import Overrides

    workspace = os.environ.get("CORPUSFORGE_WORKSPACE") or ROOT / "workspace"
    pipeline = Pipeline.open(spec_path, workspace, Overrides.from_env(os.environ))
    # run_stage_tracked logs the stage's one-line summary (corpusforge.orchestration logger).
    result = pipeline.run_stage_tracked(stage, "airflow", get_current_context()["run_id"])
    return result.flat()


def build_dag(stem: str, spec_path: Path):
    """The DAG of one spec.

    Args:
        stem: the spec file's stem (the DAG is ``corpusforge_<stem>``).
        spec_path: the spec file.

    Returns:
        The DAG.
    """

    @dag(dag_id=f"corpusforge_{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}", schedule="@daily",
         start_date=datetime(2026, 1, 1, tzinfo=timezone.utc), catchup=False, max_active_runs=1,
         default_args=DEFAULT_ARGS, tags=["corpusforge", stem],
         doc_md=f"Builds `{spec_path.name}` end to end: raw source to a published, verified snapshot.")
    def pipeline():
        spec = load_spec(spec_path)
        tasks = {}
        for stage in stages_for(spec):  # topological order: every upstream task exists already
            tasks[stage.name] = task(task_id=stage.name, doc_md=stage.description,
                                     execution_timeout=timedelta(hours=stage.timeout_hours))(run_stage)(
                str(spec_path), stage.name)
            for dep in deps_for(spec, stage.name):
                tasks[dep] >> tasks[stage.name]

    return pipeline()


for _path in sorted(PIPELINES_DIR.glob("*.yaml")):
    _dag = build_dag(_path.stem, _path.resolve())
    globals()[_dag.dag_id] = _dag
