"""The Airflow shell: one DAG per spec, `airflow dags test` on the demo DAG in a fresh sqlite
AIRFLOW_HOME, and the CLI, Dagster and Airflow agreeing on the demo snapshot.

Airflow lives in its own virtualenv (`.venv-airflow`, see docs/orchestration.md): its pins
(fastapi, ...) conflict with the serving stack of the main one. The tests drive it by subprocess.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from tests.orchestration_runs import (ROOT, airflow_bin, airflow_build, chunk_ids, cli_build, dagster_build, manifest,
                                offline_env, scratch, snapshot_dir)

# these modules share the session's demo builds (tests/orchestration_runs.py): one xdist worker
pytestmark = pytest.mark.xdist_group("demo-builds")

STAGES = ["extract", "clean", "chunk", "embed", "index", "evaluate", "publish"]
SPEC_STEMS = sorted(p.stem for p in (ROOT / "pipelines").glob("*.yaml"))

_DESCRIBE_DAGS = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": {}}
for dag_id, dag in bag.dags.items():
    out["dags"][dag_id] = {
        "schedule": str(dag.schedule), "catchup": dag.catchup, "tags": sorted(dag.tags),
        "tasks": [t.task_id for t in dag.topological_sort()],
        "upstream": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks},
        "retries": {t.task_id: t.retries for t in dag.tasks},
        "timeouts": {t.task_id: t.execution_timeout.total_seconds() for t in dag.tasks},
        "params": {k: dag.params.get_param(k).schema for k in dag.params},
        "outlets": {t.task_id: [[a.name, a.uri] for a in t.outlets] for t in dag.tasks if t.outlets},
    }
print(json.dumps(out))
"""


def test_one_dag_per_spec_with_retries_timeouts_and_a_daily_schedule():
    home = scratch() / "airflow-parse-home"
    home.mkdir(exist_ok=True)
    out = subprocess.run([airflow_bin("python"), "-c", _DESCRIBE_DAGS, str(ROOT / "dags")], capture_output=True,
                         text=True, timeout=300, cwd=ROOT,
                         env=offline_env(AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False",
                                         CORPUSFORGE_WORKSPACE="", CORPUSFORGE_PUBLISH_ROOT=""))
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["errors"] == {}
    assert sorted(found["dags"]) == [f"corpusforge_{s}" for s in SPEC_STEMS]
    demo = found["dags"]["corpusforge_demo"]
    assert demo["tasks"] == STAGES
    assert demo["upstream"] == {s: ([STAGES[i - 1]] if i else []) for i, s in enumerate(STAGES)}
    assert demo["schedule"] == "@daily" and demo["catchup"] is False and "demo" in demo["tags"]
    assert set(demo["retries"].values()) == {2}
    assert demo["timeouts"]["embed"] == 8 * 3600 and min(demo["timeouts"].values()) >= 3600
    # the trigger form: validated Params from the spec's own stages
    assert demo["params"]["until"]["enum"] == STAGES and demo["params"]["force"]["type"] == "boolean"
    assert demo["params"]["alias"]["pattern"] == r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
    # publish updates the snapshot's Airflow asset (the index folder under the publish root)
    assert demo["outlets"] == {"publish": [["corpusforge/demo", (ROOT / "workspace" / "snapshots" / "demo").as_uri()]]}
    # a training spec's DAG carries the training branch of the stage graph
    train = found["dags"]["corpusforge_demo-train"]
    assert train["tasks"] == ["extract", "clean", "chunk", "embed", "index", "mine", "train_retriever",
                              "embed_trained", "index_trained", "train_reranker", "evaluate", "publish"]
    assert train["upstream"]["embed_trained"] == ["chunk", "train_retriever"]
    assert train["upstream"]["train_reranker"] == ["index_trained", "mine"]
    assert train["upstream"]["evaluate"] == ["index", "index_trained", "train_reranker"]
    assert train["params"]["until"]["enum"] == train["tasks"]


@pytest.mark.slow
def test_dags_test_builds_the_demo_snapshot():
    from corpusforge.snapshots import SnapshotStore

    ws, output = airflow_build()
    assert re.search(r"DagRun Finished: dag_id=corpusforge_demo.*state=success", output), output[-3000:]
    for stage in STAGES:  # the task logs show each stage's summary
        assert re.search(rf"demo {stage}: ran in [0-9.]+s: stage={stage} ", output), stage
    assert "demo extract: ran in" in output and "rows=41 quarantined=0" in output
    m = manifest(ws)
    version = snapshot_dir(ws).name
    assert SnapshotStore(str(ws / "snapshots")).verify("demo", version).ok
    assert set(m["metrics"]) == {"bm25", "dense", "hybrid"}
    assert m["totals"]["files"] == len(m["files"]) and len(chunk_ids(ws)) > 41


@pytest.mark.slow
def test_cli_dagster_and_airflow_publish_the_same_snapshot_content():
    builds = {"cli": cli_build(), "dagster": dagster_build()[0], "airflow": airflow_build()[0]}
    manifests = {name: manifest(ws) for name, ws in builds.items()}
    ids = {name: chunk_ids(ws) for name, ws in builds.items()}
    assert len({m["corpus_hash"] for m in manifests.values()}) == 1
    assert ids["cli"] == ids["dagster"] == ids["airflow"] and len(ids["cli"]) > 41
    assert manifests["cli"]["metrics"] == manifests["dagster"]["metrics"] == manifests["airflow"]["metrics"]
    assert len({json.dumps(m["extra"]["stage_fingerprints"], sort_keys=True) for m in manifests.values()}) == 1
    # Three independent publishes: three different snapshot folders.
    assert len({snapshot_dir(ws) for ws in builds.values()}) == 3


@pytest.mark.timeout(3600)  # three whole-graph builds, training included
def test_cli_dagster_and_airflow_build_byte_equal_snapshots_training_included():
    """The whole graph (demo-train: mine, bi-encoder, re-embed, re-index, reranker) through the three runners."""
    from tests.orchestration_runs import content_digests

    ws_dagster, result = dagster_build("demo-train")
    assert result.success
    ws_airflow, output = airflow_build("demo-train")
    assert re.search(r"DagRun Finished: dag_id=corpusforge_demo-train.*state=success", output), output[-3000:]
    for stage in ("mine", "train_retriever", "embed_trained", "index_trained", "train_reranker"):
        assert re.search(rf"demo-train {stage}: ran in [0-9.]+s: ", output), stage
    digests = {"cli": content_digests(cli_build("demo-train"), "demo-train"),
               "dagster": content_digests(ws_dagster, "demo-train"),
               "airflow": content_digests(ws_airflow, "demo-train")}
    paths = set(digests["cli"])
    assert {"model/model.safetensors", "reranker/doc_tokens.npy", "dense/shard-00000.faiss",
            "bm25/vocab.index.json", "chunks/part-00000.parquet"} <= paths
    assert digests["cli"] == digests["dagster"] == digests["airflow"]
