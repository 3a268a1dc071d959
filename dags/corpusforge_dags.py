"""Airflow DAGs: one per pipeline spec (``pipelines/<stem>.yaml`` -> DAG ``corpusforge_<stem>``).

Each DAG is generated from the stage graph (`corpusforge.graph`): one TaskFlow task per stage the
spec runs (the training branch only with ``train.enabled``), wired by the graph's dependencies,
each calling `Pipeline.run_stage_tracked`,
so a rerun skips unchanged stages and each stage is an MLflow run tagged with the Airflow run id.
Task logs show each stage's summary; library progress bars are off (`Pipeline.open`).

The trigger form takes validated Params: ``until`` (a stage of that spec's graph; later tasks are
skipped), ``force`` (redo unchanged stages) and ``alias`` (the alias publish moves). The publish task
updates the Airflow Asset ``corpusforge/<index>`` (URI: the snapshot root's ``<index>`` folder), so
downstream DAGs can be scheduled on each new snapshot.

With ``execution.jobs_address`` (or ``CORPUSFORGE_RAY_JOBS_ADDRESS``) a task does not run its stage
itself: it submits it to that Ray cluster as a Ray job (`corpusforge.engines.ray_jobs`) and follows
its status and logs; the job is stopped when the task is killed or times out.

Settings come from the environment of the workers (the same names as the Dagster resources):
``CORPUSFORGE_WORKSPACE`` (default: ``workspace/`` in the repository), ``CORPUSFORGE_PIPELINES_DIR``,
``CORPUSFORGE_PUBLISH_ROOT`` / ``CORPUSFORGE_S3_ENDPOINT_URL`` (e.g. publish to S3),
``CORPUSFORGE_MLFLOW_TRACKING_URI``, ``CORPUSFORGE_MLFLOW_EXPERIMENT``, ``CORPUSFORGE_DEVICE``;
``CORPUSFORGE_AIRFLOW_RETRIES`` (default 2) and ``CORPUSFORGE_AIRFLOW_SCHEDULE`` (default
``@daily``; ``none``: triggered runs only) where the DAG file is parsed.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from corpusforge.graph import deps_for, stages_for
from corpusforge.spec import Overrides, PipelineSpec, apply_overrides, load_spec, with_alias

ROOT = Path(__file__).resolve().parent.parent
PIPELINES_DIR = Path(os.environ.get("CORPUSFORGE_PIPELINES_DIR") or ROOT / "pipelines")
# Retries cover transient failures (S3, MLflow server); CORPUSFORGE_AIRFLOW_RETRIES=0 fails fast (tests).
DEFAULT_ARGS = {"owner": "corpusforge", "retries": int(os.environ.get("CORPUSFORGE_AIRFLOW_RETRIES", "2")),
                "retry_delay": timedelta(minutes=5),
                "retry_exponential_backoff": True, "max_retry_delay": timedelta(minutes=30)}
# CORPUSFORGE_AIRFLOW_SCHEDULE: a cron expression or preset, or "none" for runs triggered by hand only.
_SCHEDULE = os.environ.get("CORPUSFORGE_AIRFLOW_SCHEDULE", "@daily")
SCHEDULE = None if _SCHEDULE.lower() == "none" else _SCHEDULE
# Snapshot index and alias names (corpusforge.snapshots.manifest.NAME_RE), for the alias Param.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


def workspace_root() -> Path:
    """The workspace root: ``$CORPUSFORGE_WORKSPACE``, else ``workspace/`` in the repository."""
    return Path(os.environ.get("CORPUSFORGE_WORKSPACE") or ROOT / "workspace")


def run_stage(spec_path: str, stage: str) -> dict:
    """Run one stage of a spec (the body of every task), as the run's Params say.

    Params: ``until`` (stages after it are skipped), ``force`` (redo the stage even when unchanged),
    ``alias`` (publish under this alias instead of the spec's ``publish.alias``).

    Args:
        spec_path: the spec's YAML file.
        stage: the stage.

    Returns:
        The stage's metadata (counts, metrics, version), pushed as the task's XCom.

    Raises:
        AirflowSkipException: the stage comes after ``until`` (its downstream tasks are skipped too).
    """
    from corpusforge.pipeline import Pipeline

    context = get_current_context()
    params = context["params"]
    pipeline = Pipeline.open(spec_path, workspace_root(), Overrides.from_env(os.environ))
    if stage not in pipeline.stages(params.get("until")):
        raise AirflowSkipException(f"{stage} comes after until={params['until']}")
    pipeline.force = bool(params.get("force"))
    if params.get("alias"):
        pipeline.spec = with_alias(pipeline.spec, params["alias"])
    from corpusforge.engines.ray_jobs import run_step, submission_id

    ti = context["ti"]
    facts = run_step(pipeline, spec_path, stage, orchestrator="airflow", run_id=context["run_id"],
                     job_id=submission_id(ti.dag_id, context["run_id"], stage, f"try{ti.try_number}"),
                     alias=params.get("alias"))
    if stage == "publish":
        for asset in context["task"].outlets:  # the snapshot's asset event says which version it is
            context["outlet_events"][asset].extra = {
                k: facts.get(k) for k in ("index", "version", "alias", "promoted", "promotion", "root")}
    return facts


def snapshot_asset(spec: PipelineSpec) -> Asset:
    """The Airflow Asset a spec's publish task updates: ``corpusforge/<index>``, at the snapshot root.

    A downstream DAG scheduled on it (``schedule=[snapshot_asset(spec)]``, or ``Asset.ref(name=...)``)
    runs after each publish; the event's ``extra`` carries the version, alias and promotion decision.

    Args:
        spec: the spec (with this environment's overrides: the publish root may be S3).

    Returns:
        The asset (its URI is ``file://...`` or ``s3://...`` of ``<publish root>/<index>``).
    """
    from corpusforge.workspace import Workspace

    index = spec.publish.index_name or spec.name
    root = Workspace.for_spec(spec, workspace_root()).publish_root(spec).rstrip("/")
    uri = root if "://" in root else Path(root).resolve().as_uri()
    return Asset(name=f"corpusforge/{index}", uri=f"{uri}/{index}", group="corpusforge")


def params_for(spec: PipelineSpec) -> dict[str, Param]:
    """The trigger form of a spec's DAG: validated Params, from the spec's own stage graph."""
    stages = [s.name for s in stages_for(spec)]
    return {
        "until": Param(stages[-1], type="string", enum=stages, title="Run until",
                       description="The last stage to run; the later ones are skipped."),
        "force": Param(False, type="boolean", title="Force",
                       description="Redo every stage even when its inputs and configuration are unchanged."),
        "alias": Param(None, type=["null", "string"], pattern=NAME_PATTERN, title="Publish alias",
                       description=f"The alias publish moves (empty: the spec's, {spec.publish.alias!r}; "
                                   f"promote rule {spec.publish.promote!r})."),
    }


def build_dag(stem: str, spec_path: Path):
    """The DAG of one spec.

    Args:
        stem: the spec file's stem (the DAG is ``corpusforge_<stem>``).
        spec_path: the spec file.

    Returns:
        The DAG.
    """
    spec = apply_overrides(load_spec(spec_path), Overrides.from_env(os.environ))

    @dag(dag_id=f"corpusforge_{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}", schedule=SCHEDULE,
         start_date=datetime(2026, 1, 1, tzinfo=timezone.utc), catchup=False, max_active_runs=1,
         default_args=DEFAULT_ARGS, tags=["corpusforge", stem], params=params_for(spec),
         doc_md=f"Builds `{spec_path.name}` end to end: raw source to a published, verified snapshot "
                f"(Airflow asset `{snapshot_asset(spec).name}`).")
    def pipeline():
        tasks = {}
        for stage in stages_for(spec):  # topological order: every upstream task exists already
            outlets = [snapshot_asset(spec)] if stage.name == "publish" else []
            tasks[stage.name] = task(task_id=stage.name, doc_md=stage.description, outlets=outlets,
                                     execution_timeout=timedelta(hours=stage.timeout_hours))(run_stage)(
                str(spec_path), stage.name)
            for dep in deps_for(spec, stage.name):
                tasks[dep] >> tasks[stage.name]

    return pipeline()


for _path in sorted(PIPELINES_DIR.glob("*.yaml")):
    _dag = build_dag(_path.stem, _path.resolve())
    globals()[_dag.dag_id] = _dag
