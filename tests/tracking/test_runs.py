"""How builds land in MLflow: no run for a no-op rerun, one parent run per orchestrated build with the
stage runs nested under it, and a copied workspace that writes to its own artifact store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from corpusforge.pipeline import Pipeline
from corpusforge.spec import load_spec
from corpusforge.tracking.tracker import default_tracking_uri

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "pipelines" / "demo.yaml"


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    """The demo spec run up to chunk (one MLflow run); tests work on copies of this workspace."""
    ws = tmp_path_factory.mktemp("chunked")
    Pipeline(load_spec(SPEC), workspace=ws, progress=False).run(until="chunk")
    return ws


def _copy(ws: Path, tmp_path: Path) -> Path:
    shutil.copytree(ws, tmp_path / "ws")
    return tmp_path / "ws"


def _runs(ws: Path):
    client = MlflowClient(default_tracking_uri(ws))
    return client, client.search_runs([client.get_experiment_by_name("demo").experiment_id])


def test_a_rerun_that_changes_nothing_records_no_run(chunked, tmp_path):
    ws = _copy(chunked, tmp_path)
    again = Pipeline(load_spec(SPEC), workspace=ws, progress=False).run(until="chunk")
    assert all(r.skipped for r in again)
    _, runs = _runs(ws)
    assert len(runs) == 1  # the first build's only

    # a change redoes chunk only: one new run, which still records the skipped stages' facts
    spec = load_spec(SPEC)
    spec = spec.model_copy(update={"chunk": spec.chunk.model_copy(update={"overlap_tokens": 4})})
    redone = Pipeline(spec, workspace=ws, progress=False).run(until="chunk")
    assert [r.skipped for r in redone] == [True, True, False]
    _, runs = _runs(ws)
    assert len(runs) == 2
    latest = runs[0]
    assert latest.data.params["chunk.overlap_tokens"] == "4"
    assert latest.data.tags["stage.extract"] == "skipped" and latest.data.tags["stage.chunk"] == "ran"
    assert latest.data.metrics["extract/rows"] == 41 and "chunk/tokens/mean" in latest.data.metrics


def test_an_orchestrated_build_is_one_parent_run_with_the_stage_runs_nested(chunked, tmp_path):
    ws = _copy(chunked, tmp_path)
    for stage in ("extract", "clean", "chunk"):  # an orchestrated build restarts from scratch here
        (ws / "demo" / "state" / f"{stage}.json").unlink()
    pipeline = Pipeline.open(SPEC, ws)
    first = pipeline.run_stage_tracked("extract", "airflow", "manual__2026-01-01T00:00:00+00:00")
    second = pipeline.run_stage_tracked("clean", "airflow", "manual__2026-01-01T00:00:00+00:00")
    parent_id = first.tracking["parent_run_id"]
    assert second.tracking["parent_run_id"] == parent_id  # found again by the orchestrator's run id
    client, runs = _runs(ws)
    by_id = {r.info.run_id: r for r in runs}
    parent = by_id[parent_id]
    assert parent.data.tags["corpusforge.role"] == "build" and "mlflow.parentRunId" not in parent.data.tags
    assert parent.data.tags["corpusforge.orchestrator_run_id"] == "manual__2026-01-01T00:00:00+00:00"
    assert parent.info.status == "FINISHED" and parent.data.params["chunk.max_tokens"] == "64"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(r.data.tags["corpusforge.stage"] for r in children) == ["clean", "extract"]
    assert {first.tracking["run_id"], second.tracking["run_id"]} == {r.info.run_id for r in children}
    # the parent carries every stage's facts, as a CLI run does
    assert parent.data.metrics["extract/rows"] == parent.data.metrics["clean/rows"] == 41

    # an unchanged stage records no run; another orchestrator run gets its own parent
    assert pipeline.run_stage_tracked("clean", "airflow", "scheduled__2").tracking == {}
    other = pipeline.run_stage_tracked("chunk", "dagster", "0b4c-run")
    assert other.tracking["parent_run_id"] != parent_id
    _, runs = _runs(ws)
    assert len([r for r in runs if "corpusforge.orchestrator" in r.data.tags]) == 5  # 2 parents, 3 stage runs

    # a failing stage fails its build's run
    (ws / "demo" / "chunks").rename(ws / "demo" / "chunks-gone")
    (ws / "demo" / "state" / "embed.json").unlink(missing_ok=True)
    with pytest.raises(Exception):
        pipeline.run_stage_tracked("embed", "dagster", "0b4c-run")
    assert client.get_run(other.tracking["parent_run_id"]).info.status == "FAILED"


def test_a_copied_workspace_is_repointed_even_by_a_run_that_does_nothing(chunked, tmp_path):
    """A copy opened by a no-op rerun (no MLflow run) already reads its own artifacts in `mlflow ui`."""
    ws = _copy(chunked, tmp_path)
    runs = Pipeline(load_spec(SPEC), workspace=ws, progress=False).run(until="chunk")
    assert all(r.skipped for r in runs)
    client, records = _runs(ws)
    assert [r.info.artifact_uri for r in records] == [(ws / "mlartifacts" / records[0].info.run_id / "artifacts").as_uri()]
    assert "spec.json" in {a.path for a in client.list_artifacts(records[0].info.run_id)}


def test_a_copied_workspace_runs_again_into_its_own_store(chunked, tmp_path):
    ws = _copy(chunked, tmp_path)
    before = sorted(p for p in (chunked / "mlartifacts").rglob("*"))
    runs = Pipeline(load_spec(SPEC), workspace=ws, progress=False, force=True).run(until="chunk")
    assert not any(r.skipped for r in runs)
    client, records = _runs(ws)
    assert len(records) == 2
    for run in records:  # the copied run and the new one: both in the copy's artifact store
        assert run.info.artifact_uri == (ws / "mlartifacts" / run.info.run_id / "artifacts").as_uri()
        assert "spec.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert client.get_experiment_by_name("demo").artifact_location == (ws / "mlartifacts").as_uri()
    assert sorted(p for p in (chunked / "mlartifacts").rglob("*")) == before  # the original gained nothing
    _, original = _runs(chunked)
    assert len(original) == 1
