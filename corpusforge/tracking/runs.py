"""What a pipeline build records in MLflow, beyond the spec: stage facts, inputs, source, build runs.

- **Stage facts** (`log_stage`): a stage's `StageResult.metrics` as metrics and its
  `StageResult.params` (configuration restated by the stage: ``embed/dim``, batch sizes, the FAISS
  factory as built) as params, both named by `StageResult.mlflow_key`; its other facts (snapshot
  version, corpus hash, registered model...) as tags.
- **Inputs** (``mlflow.log_input``, `log_inputs`): the cleaned corpus (``documents_clean``, digest
  = the corpus hash the snapshot manifest records) and the query sets a stage read (the report
  split for evaluate, the seeded train/dev shares of the training judgments for mine and evaluate),
  each with a digest of its queries and judgments.
- **Source** (`source_tags`): ``mlflow.source.type``/``name``, ``mlflow.user`` and, when the spec
  lies in a git checkout (else corpusforge's own), ``mlflow.source.git.commit``/``branch``/``repoURL``.
- **Build runs** (`build_run`, `settle_build_run`): an orchestrated build (one Dagster or Airflow
  run) gets one parent run, found by a tag derived from the orchestrator's run id or created by the
  first stage that does work; each stage's run is nested under it (``mlflow.parentRunId``) and the
  parent carries every stage's facts, so it compares with a CLI run.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

if TYPE_CHECKING:  # pragma: no cover
    from corpusforge.tracking.tracker import RunTracker

# `pipeline.Pipeline` and `pipeline.StageResult` call into this module, so they are not imported here
# (not even for type checking: the core has no import cycles); arguments named so are those.
Pipeline = StageResult = Any

log = logging.getLogger("corpusforge.tracking.tracker")

ROLE_TAG = "corpusforge.role"  # "build" on an orchestrated build's parent run
BUILD_KEY_TAG = "corpusforge.build_key"  # digest of (orchestrator, run id): safe in a search filter
_IDENTITY = ("stage", "skipped", "fingerprint")  # recorded as tags by `log_stage` already


def log_stage(tracker: "RunTracker", pipeline: Pipeline, result: StageResult) -> None:
    """Log a stage's facts to a run: status tags, metrics, params, other facts as tags, and its inputs.

    Args:
        tracker: a started run.
        pipeline: the pipeline the stage belongs to.
        result: the stage's result.
    """
    metrics, params = result.metrics(), result.params()
    tags = {f"stage.{result.stage}": "skipped" if result.skipped else "ran",
            f"fingerprint.{result.stage}": result.fingerprint}
    tags |= {result.mlflow_key(k): v for k, v in result.flat().items()
             if k not in metrics and k not in params and k not in _IDENTITY}
    tracker.set_tags(tags)
    tracker.log_metrics({result.mlflow_key(k): v for k, v in metrics.items()})
    _log_params(tracker, {result.mlflow_key(k): v for k, v in params.items()})
    log_inputs(tracker, pipeline, result)


def _log_params(tracker: "RunTracker", params: Mapping[str, Any]) -> None:
    """Log params; one already logged with another value (a stage rerun into a build's run) is kept, with a warning."""
    try:
        tracker.log_params(params)
    except ValueError:
        for key, value in params.items():
            try:
                tracker.log_params({key: value})
            except ValueError as exc:
                log.warning("MLflow run %s: %s", tracker.run_id, exc)


def log_inputs(tracker: "RunTracker", pipeline: Pipeline, result: StageResult) -> None:
    """Record the datasets a stage read as the run's inputs (``mlflow.log_input``).

    The corpus for clean, evaluate and publish; the report split's queries for evaluate; the
    training and dev query sets for mine, and the dev set for evaluate when the source has
    training judgments.

    Args:
        tracker: a started run.
        pipeline: the pipeline.
        result: the stage's result.
    """
    stage, spec = result.stage, pipeline.spec
    if stage in ("clean", "evaluate", "publish"):
        _log_corpus(tracker, pipeline)
    if stage == "evaluate":
        from corpusforge.evaluation.offline import judged_queries

        split = spec.evaluate.split
        queries, qrels = judged_queries(spec, split)
        _log_queries(tracker, f"queries/{split}", queries, qrels, f"{spec.source_uri}/qrels/{split}.tsv",
                     "evaluation")
    if stage == "mine" or stage == "evaluate" and "dev" in result.summary:
        data = _training_data(pipeline)
        if data is not None:
            train = f"{spec.source_uri}/qrels/train.tsv"
            if stage == "mine":
                _log_queries(tracker, "queries/train", data.queries, data.train_qrels, train, "training")
            _log_queries(tracker, "queries/dev", data.queries, data.dev_qrels, train, "validation")


def _training_data(pipeline: Pipeline):
    from corpusforge.train.data import training_data_for

    try:
        return training_data_for(pipeline.spec, pipeline.ws)
    except (FileNotFoundError, ValueError):
        return None


def _log_corpus(tracker: "RunTracker", pipeline: Pipeline) -> None:
    from corpusforge.data import datasets
    from corpusforge.snapshots.build import corpus_hash

    path = pipeline.ws.dataset("documents_clean")
    if not datasets.is_complete(path):
        return
    table = datasets.open_dataset(path)
    tracker.log_dataset("documents_clean", corpus_hash(path), str(path), "corpus", rows=table.count_rows(),
                        schema=table.schema, tags={"corpusforge.source": pipeline.spec.source_uri})


def _log_queries(tracker: "RunTracker", name: str, queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]],
                 uri: str, context: str) -> None:
    import pyarrow as pa

    tracker.log_dataset(name, query_set_digest(queries, qrels), uri, context, rows=len(qrels),
                        schema=pa.schema([pa.field("query_id", pa.string(), nullable=False),
                                          pa.field("text", pa.string(), nullable=False)]),
                        tags={"corpusforge.judgments": str(sum(len(v) for v in qrels.values()))})


def query_set_digest(queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]]) -> str:
    """A sha256 of a judged query set: each judged query's id and text, and its judgments, in id order.

    Args:
        queries: query id -> text (queries without judgments are not part of the set).
        qrels: query id -> {doc id: grade}.

    Returns:
        64 hex characters; equal for equal query sets, whatever order they were read in.
    """
    h = hashlib.sha256()
    for qid in sorted(qrels):
        judged = ",".join(f"{d}:{g}" for d, g in sorted(qrels[qid].items()))
        h.update(f"{qid}\x1f{queries.get(qid, '')}\x1f{judged}\n".encode())
    return h.hexdigest()


def source_tags(spec_dir: str | Path, orchestrator: str | None = None) -> dict[str, str]:
    """MLflow's source tags for a run of a spec.

    Args:
        spec_dir: the spec file's folder (its git checkout, if any, names the commit).
        orchestrator: ``dagster`` / ``airflow``, or None for the CLI.

    Returns:
        ``mlflow.source.type`` (``JOB`` under an orchestrator, else ``LOCAL``), ``mlflow.source.name``,
        ``mlflow.user`` and the git tags of `git_tags` (the spec's checkout, else corpusforge's).
    """
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = ""
    tags = {"mlflow.source.type": "JOB" if orchestrator else "LOCAL",
            "mlflow.source.name": f"corpusforge ({orchestrator or 'cli'})"}
    if user:
        tags["mlflow.user"] = user
    return tags | (git_tags(spec_dir) or git_tags(Path(__file__).resolve().parent))


def git_tags(folder: str | Path) -> dict[str, str]:
    """The git state of the checkout holding `folder`, as MLflow's source tags.

    Args:
        folder: any folder.

    Returns:
        ``mlflow.source.git.commit``, ``mlflow.source.git.branch`` (unless detached),
        ``mlflow.source.git.repoURL`` (the ``origin`` remote, when there is one) and
        ``corpusforge.git.dirty`` (``true`` when tracked files differ from the commit); empty
        outside a git checkout or without git.
    """
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    tags = {"mlflow.source.git.commit": commit}
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    remote = git("remote", "get-url", "origin")
    if remote:
        tags["mlflow.source.git.repoURL"] = remote
    status = git("status", "--porcelain", "--untracked-files=no")
    if status is not None:
        tags["corpusforge.git.dirty"] = "true" if status else "false"
    return tags


def build_key(orchestrator: str, run_id: str) -> str:
    """The tag value that finds an orchestrated build's parent run (hex: any run id is safe in a filter)."""
    return hashlib.sha256(f"{orchestrator}\x1f{run_id}".encode()).hexdigest()[:32]


def build_run(pipeline: Pipeline, orchestrator: str, run_id: str) -> "RunTracker":
    """The parent run of an orchestrated build: found by its build key, else created (spec as params).

    A lock file in the workspace serialises find-or-create, so the stages of one build that start
    together (in separate processes) share one parent.

    Args:
        pipeline: the pipeline.
        orchestrator: ``dagster`` or ``airflow``.
        run_id: the orchestrator's run id.

    Returns:
        A tracker attached to the parent run (not a context manager's: `settle_build_run` sets its
        status).
    """
    key = build_key(orchestrator, run_id)
    tracker = pipeline.run_tracker(run_name=f"{pipeline.spec.name}-{orchestrator}-build", orchestrator=orchestrator)
    pipeline.ws.root.mkdir(parents=True, exist_ok=True)
    with FileLock(pipeline.ws.root / ".mlflow-build.lock"):
        found = tracker.client.search_runs([tracker.experiment_id], f"tags.`{BUILD_KEY_TAG}` = '{key}'",
                                           order_by=["attributes.start_time ASC"], max_results=1)
        if found:
            return tracker.attach(found[0].info.run_id)
        tracker.tags |= {ROLE_TAG: "build", BUILD_KEY_TAG: key, "corpusforge.orchestrator": orchestrator,
                         "corpusforge.orchestrator_run_id": run_id}
        tracker.start()
        tracker.log_spec(pipeline.spec.report())
        return tracker


def settle_build_run(parent: "RunTracker") -> str:
    """Set a build run's status from its stage runs: FAILED when a stage's latest run failed, else FINISHED.

    Called after each stage, so the parent's end time is its last stage's and a retried stage that
    succeeds clears the failure.

    Args:
        parent: the build's parent run.

    Returns:
        The status set.
    """
    children = parent.client.search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'",
                                         order_by=["attributes.start_time DESC"])
    latest: dict[str, str] = {}
    for run in children:  # newest first: the first seen per stage is its latest attempt
        latest.setdefault(run.data.tags.get("corpusforge.stage", run.info.run_id), run.info.status)
    status = "FAILED" if "FAILED" in latest.values() or "KILLED" in latest.values() else "FINISHED"
    parent.end(status)
    return status
