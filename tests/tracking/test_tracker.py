"""MLflow tracking on a real local SQLite store, read back with MlflowClient."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from corpusforge.evaluation.metrics import evaluate
from corpusforge.evaluation.plots import plot_quality_vs_latency, plot_recall_vs_latency_sweep, quality_vs_latency_figure
from corpusforge.spec import PipelineSpec
from corpusforge.tracking.tracker import (
    PARAM_VALUE_LIMIT,
    TRUNCATION_MARK,
    RunTracker,
    default_tracking_uri,
    flatten,
    log_eval,
    new_local_store,
    repoint_artifacts,
    sanitize_name,
    sqlite_path,
)

EXPERIMENT = "corpusforge-tests"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store per module: creating it runs MLflow's schema migrations (seconds)."""
    workspace = tmp_path_factory.mktemp("workspace")
    uri = default_tracking_uri(workspace)
    with RunTracker(uri, EXPERIMENT, run_name="bootstrap"):
        pass
    from mlflow import MlflowClient

    return {"workspace": workspace, "uri": uri, "client": MlflowClient(tracking_uri=uri)}


def _spec(**overrides) -> PipelineSpec:
    return PipelineSpec(name="scifact", source={"format": "beir", "path": "data/scifact"}, **overrides)


def test_default_tracking_uri_is_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri("ws")
    assert uri == f"sqlite:///{(tmp_path / 'ws' / 'mlflow.db').as_posix()}"
    assert uri.startswith("sqlite:////")  # four slashes: an absolute path
    assert sqlite_path(uri) == tmp_path / "ws" / "mlflow.db"
    assert sqlite_path("http://mlflow:5000") is None
    with pytest.raises(ValueError, match="need a SQLite file"):
        sqlite_path("sqlite:///:memory:")


def test_sanitize_and_flatten():
    assert sanitize_name("test.hybrid.ndcg@10") == "test.hybrid.ndcg_10"
    assert sanitize_name("a//b/./c:d") == "a/b/c_d"
    long = sanitize_name("x" * 300)
    assert len(long) == 250 and long != sanitize_name("x" * 301)
    assert flatten({"a": {"b": 1, "c": {}}, "d": [1, 2]}) == {"a.b": 1, "a.c": {}, "d": [1, 2]}


def test_run_logs_spec_metrics_table_and_plot(store, tmp_path):
    spec = _spec(description="d" * 1200)  # longer than a param value may be
    result = evaluate({"1": {"a": 1.0, "b": 0.5}, "2": {"c": 0.1}}, {"1": {"b": 1}, "2": {"c": 2}, "3": {"d": 1}})
    points = [
        {"mode": "bm25", "ndcg_10": 0.662, "recall_100": 0.93, "latency_ms_p50": 1.5},
        {"mode": "dense", "ndcg_10": 0.645, "recall_100": 0.92, "latency_ms_p50": 6.0, "label": "Flat"},
    ]
    png = plot_quality_vs_latency(points, tmp_path / "plots" / "quality_vs_latency.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with RunTracker(store["uri"], EXPERIMENT, run_name="eval", tags={"split": "test"}) as tracker:
        params = tracker.log_spec(spec.report())
        logged = log_eval(tracker, {"hybrid": result})
        tracker.log_metrics({"ndcg@10": 0.5}, step=1, prefix="dev/")
        tracker.log_metrics({"ndcg@10": 0.6}, step=2, prefix="dev/")
        tracker.log_table(pa.table({"mode": ["bm25", "dense"], "ndcg_10": [0.662, 0.645]}), "summary.csv")
        tracker.log_figure(png)
        tracker.log_figure(quality_vs_latency_figure(points), "figures/inline.png")
        tracker.log_dict({"ok": True}, "eval/extra.json")
        run_id = tracker.run_id

    client = store["client"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "eval" and run.data.tags["split"] == "test"
    p = run.data.params
    assert p["name"] == "scifact" and p["source.format"] == "beir"
    assert p["chunk.max_tokens"] == "256" and p["evaluate.modes"] == '["bm25","dense","hybrid"]'
    assert p == params and len(p) == len(flatten(spec.report()))  # every leaf of the spec
    assert logged["test/hybrid/ndcg_10"] == pytest.approx(result.mean["ndcg@10"])
    assert run.data.metrics["test/hybrid/ndcg_10"] == pytest.approx(result.mean["ndcg@10"])
    assert run.data.metrics["test/hybrid/recall_100"] == pytest.approx(result.mean["recall@100"])
    history = client.get_metric_history(run_id, "dev/ndcg_10")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.6)]

    artifacts = tracker.list_artifacts()
    assert artifacts == sorted([
        "spec.json", "summary.csv", "figures/quality_vs_latency.png", "figures/inline.png",
        "eval/extra.json", "eval/test/hybrid_per_query.parquet",
    ])
    # Artifacts live under <workspace>/mlartifacts, where the experiment was pointed.
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.artifact_location == (store["workspace"] / "mlartifacts").as_uri()
    local = Path(client.download_artifacts(run_id, "eval/test/hybrid_per_query.parquet", str(tmp_path)))
    table = pq.read_table(local)
    assert table.num_rows == 3 and table.column("query_id").to_pylist() == ["1", "2", "3"]
    csv = pacsv.read_csv(client.download_artifacts(run_id, "summary.csv", str(tmp_path)))
    assert csv.column("mode").to_pylist() == ["bm25", "dense"]
    run_dir = store["workspace"] / "mlartifacts" / run_id / "artifacts"
    assert (run_dir / "figures" / "inline.png").read_bytes()[:4] == b"\x89PNG"


def test_long_params_are_truncated_but_spec_json_is_complete(store, tmp_path):
    description = "word " * 400  # 2,000 characters
    with RunTracker(store["uri"], EXPERIMENT, run_name="long") as tracker:
        tracker.log_spec(_spec(description=description))
        tracker.log_params({"x" * 300: "y"})  # over-long key: shortened, not rejected
        tracker.log_params({f"grid.p{i}": i for i in range(250)})  # > MLflow's 100 params per batch
    run = store["client"].get_run(tracker.run_id)
    value = run.data.params["description"]
    assert len(value) == PARAM_VALUE_LIMIT and value.endswith(TRUNCATION_MARK)
    assert description.startswith(value[: -len(TRUNCATION_MARK)])
    spec_file = store["client"].download_artifacts(tracker.run_id, "spec.json", str(tmp_path))
    full = json.loads(Path(spec_file).read_text())
    assert full["description"] == description and full["source"]["path"] == "data/scifact"
    assert any(len(k) == 250 for k in run.data.params)
    assert all(run.data.params[f"grid.p{i}"] == str(i) for i in range(250))


def test_failing_block_marks_run_failed_and_reraises(store):
    with pytest.raises(RuntimeError, match="index build exploded"):
        with RunTracker(store["uri"], EXPERIMENT, run_name="broken") as tracker:
            tracker.log_metrics({"partial": 1.0})
            raise RuntimeError("index build exploded")
    run = store["client"].get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["corpusforge.error"] == "RuntimeError: index build exploded"
    assert run.data.metrics["partial"] == 1.0


def test_nested_runs_and_param_immutability(store, tmp_path):
    sweep = [{"param": "efSearch", "value": v, "recall_10": r, "latency_ms": lat}
             for v, r, lat in [(16, 0.8, 0.2), (64, 0.95, 0.5), (256, 0.99, 1.4)]]
    png = plot_recall_vs_latency_sweep(sweep, tmp_path / "sweep.png")
    with RunTracker(store["uri"], EXPERIMENT, run_name="parent") as parent:
        for i, row in enumerate(sweep):
            with parent.child(f"efSearch={row['value']}") as child:
                child.log_params({"efSearch": row["value"]})
                child.log_metrics({"recall@10": row["recall_10"]}, step=i)
        parent.log_figure(png)
        parent.log_params({"k": 10})
        parent.log_params({"k": 10})  # same value again: fine
        with pytest.raises(ValueError, match="already logged"):
            parent.log_params({"k": 20})
        with pytest.raises(TypeError, match="expected a number"):
            parent.log_metrics({"bad": "high"})
    client = store["client"]
    children = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'",
    )
    assert sorted(r.data.params["efSearch"] for r in children) == ["16", "256", "64"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert "figures/sweep.png" in parent.list_artifacts()


def test_experiment_description_attach_and_dataset_inputs(store):
    with RunTracker(store["uri"], "described", run_name="one", description="41 documents, 12 queries") as tracker:
        tracker.log_dataset("documents_clean", "a" * 64, str(store["workspace"] / "docs"), "corpus", rows=41,
                            schema=pa.schema([pa.field("doc_id", pa.string(), nullable=False),
                                              pa.field("n", pa.int64())]), tags={"corpusforge.source": "s3://b/p"})
    client = store["client"]
    experiment = client.get_experiment_by_name("described")
    assert experiment.tags["mlflow.note.content"] == "41 documents, 12 queries"
    with RunTracker(store["uri"], "described", description="a new description"):
        pass
    assert client.get_experiment_by_name("described").tags["mlflow.note.content"] == "a new description"

    (item,) = client.get_run(tracker.run_id).inputs.dataset_inputs
    assert item.dataset.name == "documents_clean" and item.dataset.digest == "a" * 36  # MLflow's limit
    assert json.loads(item.dataset.profile) == {"digest": "a" * 64, "num_rows": 41}
    assert json.loads(item.dataset.source) == {"uri": (store["workspace"] / "docs").as_uri()}
    assert json.loads(item.dataset.schema)["mlflow_colspec"] == [
        {"name": "doc_id", "type": "string", "required": True}, {"name": "n", "type": "long", "required": False}]
    assert {t.key: t.value for t in item.tags} == {"mlflow.data.context": "corpus", "corpusforge.source": "s3://b/p"}

    # attach: log to an existing run without creating one; params keep their immutability
    again = RunTracker(store["uri"], "described").attach(tracker.run_id)
    again.log_metrics({"later": 2.0})
    assert client.get_run(tracker.run_id).data.metrics["later"] == 2.0
    assert len(client.search_runs([experiment.experiment_id])) == 2


def test_a_copied_workspace_writes_and_reads_its_own_artifacts(tmp_path):
    from mlflow import MlflowClient

    original, copy = tmp_path / "original", tmp_path / "copy"
    with RunTracker(default_tracking_uri(original), "portable", run_name="before") as tracker:
        tracker.log_dict({"where": "original"}, "facts.json")
        first = tracker.run_id
    shutil.copytree(original, copy)
    before = sorted(p.relative_to(original) for p in (original / "mlartifacts").rglob("*"))

    with RunTracker(default_tracking_uri(copy), "portable", run_name="after") as tracker:  # opening re-points
        tracker.log_dict({"where": "copy"}, "facts.json")
    assert tracker.artifact_uri == (copy / "mlartifacts" / tracker.run_id / "artifacts").as_uri()
    client = MlflowClient(default_tracking_uri(copy))
    assert client.get_experiment_by_name("portable").artifact_location == (copy / "mlartifacts").as_uri()
    assert client.get_run(first).info.artifact_uri == (copy / "mlartifacts" / first / "artifacts").as_uri()
    # the original is untouched: its store still points at itself, no file was added to it
    assert sorted(p.relative_to(original) for p in (original / "mlartifacts").rglob("*")) == before
    assert MlflowClient(default_tracking_uri(original)).get_run(first).info.artifact_uri.startswith(original.as_uri())
    # the copy reads its own copy of the old run's artifacts, even with the original gone
    shutil.rmtree(original)
    assert json.loads(Path(client.download_artifacts(first, "facts.json", str(tmp_path))).read_text()) == {
        "where": "original"}
    assert repoint_artifacts(copy / "mlflow.db") == {}  # nothing left to re-point


def test_repoint_leaves_other_locations_alone(tmp_path):
    custom = (tmp_path / "elsewhere" / "artifacts").as_uri()
    with RunTracker(default_tracking_uri(tmp_path / "a"), "custom", artifact_location=custom):
        pass
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert repoint_artifacts(tmp_path / "b" / "mlflow.db") == {}
    assert repoint_artifacts(tmp_path / "missing.db") == {}


def _schema(db: Path) -> dict:
    """Tables with their columns, indexes and Alembic revision (not the CREATE texts: MLflow's
    migrations word CHECK constraints differently from one process to the next)."""
    import sqlite3

    con = sqlite3.connect(db)
    try:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {"tables": {t: con.execute(f"PRAGMA table_info('{t}')").fetchall() for t in tables},
                "indexes": con.execute("SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' "
                                       "ORDER BY name").fetchall(),
                "revision": con.execute("SELECT version_num FROM alembic_version").fetchall()}
    finally:
        con.close()


def test_a_new_store_from_the_cached_empty_store_is_the_store_mlflow_builds(tmp_path, monkeypatch):
    """The copy has MLflow's migrated schema, and MLflow gives it the Default experiment where it
    would in a store it migrated itself (under the working directory of the process that opens it,
    not of the one that made the cached store), and the same experiment ids."""
    from mlflow import MlflowClient

    monkeypatch.setenv("CORPUSFORGE_MLFLOW_SCHEMA_CACHE", str(tmp_path / "schema-cache"))
    for folder in ("first", "second", "built"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "first")
    assert new_local_store(tmp_path / "warm" / "mlflow.db") is True  # makes the cached empty store
    cached = list((tmp_path / "schema-cache").glob("mlflow-*.db"))
    assert len(cached) == 1

    monkeypatch.chdir(tmp_path / "second")
    built, copied = tmp_path / "built" / "mlflow.db", tmp_path / "copied" / "mlflow.db"
    MlflowClient(f"sqlite:///{built}").search_experiments()  # MLflow's own migrations
    assert new_local_store(copied) is True and new_local_store(copied) is False  # never replaces a store
    assert _schema(copied) == _schema(built)

    def experiments(db: Path) -> list[tuple]:
        client = MlflowClient(f"sqlite:///{db}")
        client.create_experiment("later")
        return [(e.experiment_id, e.name, e.artifact_location) for e in client.search_experiments(order_by=["name"])]

    assert experiments(copied) == experiments(built)

    stamp = cached[0].stat().st_mtime_ns  # the next store is another copy: MLflow does not migrate again
    with RunTracker(default_tracking_uri(tmp_path / "ws"), "fresh", run_name="r") as tracker:
        tracker.log_metrics({"m": 1.0})
    assert cached[0].stat().st_mtime_ns == stamp and (tmp_path / "ws" / "mlflow.db").is_file()
    assert MlflowClient(default_tracking_uri(tmp_path / "ws")).get_run(tracker.run_id).data.metrics == {"m": 1.0}
