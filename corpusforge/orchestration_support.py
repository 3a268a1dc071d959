"""What the orchestrator shells (Dagster assets, Airflow DAGs) share, without importing either.

The shells stay a few lines per stage: they find the specs (`discover_specs`), open a pipeline
with the environment's overrides (`open_pipeline`), run one stage and log it to MLflow
(`run_stage_tracked`), and turn its summary into flat numbers (`stage_metadata`). The source
watch behind the Dagster sensor (`changed_sources`) lives here too, testable without an orchestrator.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corpusforge.pipeline import Pipeline, StageResult
from corpusforge.spec import PipelineSpec, load_spec

log = logging.getLogger("corpusforge.orchestration")

def discover_specs(pipelines_dir: str | Path) -> dict[str, Path]:
    """The pipeline specs of a folder: ``{file stem: path}`` for every ``*.yaml``, sorted by stem.

    Args:
        pipelines_dir: the folder holding ``<name>.yaml`` specs.

    Returns:
        Stem -> spec path (stems are the orchestrators' partition keys and DAG names).

    Raises:
        FileNotFoundError: the folder does not exist.
    """
    folder = Path(pipelines_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"pipelines folder {folder} does not exist")
    return {p.stem: p.resolve() for p in sorted(folder.glob("*.yaml"), key=lambda p: p.stem)}


@dataclass(frozen=True)
class Overrides:
    """Per-environment settings applied on top of a spec (None keeps the spec's own value).

    Attributes:
        tracking_uri: MLflow tracking URI (spec ``tracking.uri``).
        experiment: MLflow experiment (spec ``tracking.experiment``).
        device: ``auto``, ``cpu`` or ``cuda`` (spec ``model.device``).
        publish_root: snapshot root, a local folder or ``s3://bucket/prefix`` (spec ``publish.root``).
        s3_endpoint_url: S3 endpoint for the publish root (spec ``publish.s3_endpoint_url``).
    """

    tracking_uri: str | None = None
    experiment: str | None = None
    device: str | None = None
    publish_root: str | None = None
    s3_endpoint_url: str | None = None

    # The environment variables `from_env` reads (the Dagster resources read the same names).
    ENV = {"tracking_uri": "CORPUSFORGE_MLFLOW_TRACKING_URI", "experiment": "CORPUSFORGE_MLFLOW_EXPERIMENT",
           "device": "CORPUSFORGE_DEVICE", "publish_root": "CORPUSFORGE_PUBLISH_ROOT",
           "s3_endpoint_url": "CORPUSFORGE_S3_ENDPOINT_URL"}

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "Overrides":
        """The overrides set in an environment (unset or empty variables keep the spec's values).

        Args:
            environ: e.g. ``os.environ``.

        Returns:
            The overrides.
        """
        return cls(**{field: environ.get(var) or None for field, var in cls.ENV.items()})


def apply_overrides(spec: PipelineSpec, overrides: Overrides) -> PipelineSpec:
    """A copy of `spec` with the overrides set (validated again, so a bad value is an error).

    Args:
        spec: the loaded spec.
        overrides: the environment's settings.

    Returns:
        The spec to run.
    """
    data = spec.model_dump(mode="json")
    data["base_dir"] = spec.base_dir  # excluded from dumps, needed to resolve relative paths
    if overrides.tracking_uri:
        data["tracking"]["uri"] = overrides.tracking_uri
    if overrides.experiment:
        data["tracking"]["experiment"] = overrides.experiment
    if overrides.device:
        data["model"]["device"] = overrides.device
    if overrides.publish_root:
        data["publish"]["root"] = overrides.publish_root
    if overrides.s3_endpoint_url:
        data["publish"]["s3_endpoint_url"] = overrides.s3_endpoint_url
    return PipelineSpec.model_validate(data)


def open_pipeline(spec_path: str | Path, workspace: str | Path, overrides: Overrides | None = None) -> Pipeline:
    """Load a spec, apply the environment's overrides and bind it to a workspace.

    Args:
        spec_path: the spec's YAML file.
        workspace: the workspace root (datasets, state, default MLflow store and snapshots).
        overrides: per-environment settings.

    Returns:
        A `Pipeline` without progress bars (orchestrator logs are not terminals).
    """
    spec = apply_overrides(load_spec(spec_path), overrides or Overrides())
    return Pipeline(spec, workspace=workspace, progress=False)


def run_stage_tracked(pipeline: Pipeline, stage: str, orchestrator: str, run_id: str) -> StageResult:
    """Run (or skip) one stage and record it as an MLflow run tagged with the orchestrator's run.

    Each orchestrator step is its own process, so each stage gets its own MLflow run
    (``<spec>-<stage>``), tagged ``corpusforge.orchestrator`` and ``corpusforge.orchestrator_run_id``
    so the runs of one Dagster or Airflow run can be found together. The evaluate stage's run
    carries the ``<split>.<mode>.<metric>`` metrics, as a CLI run does.

    Args:
        pipeline: the pipeline.
        stage: one of `pipeline.STAGES`.
        orchestrator: ``dagster`` or ``airflow``.
        run_id: the orchestrator's run id.

    Returns:
        The stage's result.
    """
    with pipeline.tracker(run_name=f"{pipeline.spec.name}-{stage}") as tracker:
        tracker.set_tags({"corpusforge.orchestrator": orchestrator, "corpusforge.orchestrator_run_id": run_id,
                          "corpusforge.stage": stage, "corpusforge.until": stage})
        result = pipeline.run_stage(stage, tracker=tracker)
        pipeline.log_result(tracker, result)
    log.info("%s %s: %s", pipeline.spec.name, stage, describe_result(result))
    return result


def describe_result(result: StageResult) -> str:
    """A one-line summary of a stage's result for task logs.

    Args:
        result: a stage's result.

    Returns:
        e.g. ``ran in 1.2s: rows=41 quarantined=0 ...``.
    """
    status = "skipped (unchanged)" if result.skipped else f"ran in {result.seconds:.1f}s"
    facts = " ".join(f"{k}={v}" for k, v in stage_metadata(result).items())
    return f"{status}: {facts}"


def stage_metadata(result: StageResult) -> dict[str, Any]:
    """A stage's summary as flat scalars (`StageResult.flat`): what Dagster metadata and Airflow XCom show.

    Args:
        result: a stage's result.

    Returns:
        ``{name: int | float | str | bool}``, e.g. ``rows``, ``quarantine/<reason>``,
        ``test/dense/ndcg@10``, ``dense/ntotal``.
    """
    return result.flat()


def verify_snapshot(pipeline: Pipeline) -> tuple[str, list[str]]:
    """Verify the snapshot the pipeline's last publish recorded (every file's size and sha256).

    Args:
        pipeline: a pipeline whose publish stage has run.

    Returns:
        (version, problems); no problems means the snapshot is intact.
    """
    from corpusforge.snapshot_build import index_name, store_for

    version = (pipeline.ws.read_state("publish") or {}).get("summary", {}).get("version")
    if not version:
        return "", ["the publish stage has not recorded a version"]
    report = store_for(pipeline.spec, pipeline.ws).verify(index_name(pipeline.spec), version)
    return version, list(report.problems)


def changed_sources(specs: Mapping[str, str | Path], previous: Mapping[str, str]
                    ) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Which specs' sources changed since `previous` (a sensor cursor), by `fs.fingerprint`.

    A spec first seen (absent from `previous`) is recorded without counting as changed, so
    turning a watch on does not rebuild every corpus at once (the nightly schedule does that).

    Args:
        specs: ``{name: spec path}``.
        previous: ``{name: source fingerprint}`` from the last look.

    Returns:
        (names whose source changed, ``{name: fingerprint}`` now, ``{name: error}`` for specs or
        sources that could not be read; those keep their previous fingerprint).
    """
    from corpusforge import fs

    changed, current, errors = [], {}, {}
    for name, path in specs.items():
        try:
            spec = load_spec(path)
            current[name] = fs.fingerprint(spec.source_uri, endpoint_url=spec.source.s3_endpoint_url)
        except Exception as exc:  # noqa: BLE001 - one unreadable source must not stop the others
            errors[name] = f"{type(exc).__name__}: {exc}"
            if name in previous:
                current[name] = previous[name]
            continue
        if name in previous and previous[name] != current[name]:
            changed.append(name)
    return changed, current, errors
