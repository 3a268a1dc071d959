"""The Dagster shell: the `dg` project, definitions, an in-process build of the demo graph with its
versions, metadata and partitioned checks, the webserver's GraphQL API (`dg dev`), per-environment
resources (S3 publishing), the concurrency pool, the schedule and the source sensor."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import dagster as dg
import httpx
import pytest

from corpusforge.data import datasets

from tests.orchestration_runs import (ROOT, chunk_ids, dagster_build, dagster_instance, dagster_job, manifest,
                                offline_env, scratch, snapshot_dir)
from tests.ports import free_port

# these modules share the session's demo builds (tests/orchestration_runs.py): one xdist worker
pytestmark = pytest.mark.xdist_group("demo-builds")

DATA_ASSETS = {"documents", "documents_clean", "quarantine", "chunks", "embeddings", "dense_index", "bm25_index",
               "evaluation", "snapshot"}
TRAIN_ASSETS = {"hard_negatives", "training_pairs", "retriever_model", "embeddings_trained", "dense_index_trained",
                "reranker_model"}
ASSETS = DATA_ASSETS | TRAIN_ASSETS
CHECKS = {"documents:contract", "documents_clean:contract", "quarantine:contract", "chunks:contract",
          "embeddings:contract", "hard_negatives:contract", "training_pairs:contract", "embeddings_trained:contract",
          "snapshot:verified", "snapshot:promotion"}
SPEC_STEMS = sorted(p.stem for p in (ROOT / "pipelines").glob("*.yaml"))
DEMO_CHECKS = {c for c in CHECKS if c.split(":")[0] in DATA_ASSETS}


def key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["corpusforge", name])


def name(k: dg.AssetKey) -> str:
    assert k.path[0] == "corpusforge", k  # every key is prefixed
    return k.path[-1]


def _materialisations(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetMaterialization]:
    out = {}
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        assert mat.partition == "demo"
        out[name(mat.asset_key)] = mat
    return out


def _metadata(result: dg.ExecuteInProcessResult) -> dict[str, dict]:
    """{asset name: {metadata name: value}} of a run's materialisations."""
    return {k: {n: v.value for n, v in m.metadata.items()} for k, m in _materialisations(result).items()}


def _statuses(assets=None) -> dict[str, str]:
    """Dagster's stale status of partition 'demo' of every stage asset, in the shared build's instance."""
    from dagster._utils.test.data_versions import get_stale_status_resolver

    from corpusforge_dagster.assets import ASSETS as ALL

    resolver = get_stale_status_resolver(dagster_instance(), assets or ALL)
    return {n: resolver.get_status(key(n), "demo").value for n in ASSETS}


def test_definitions_list_assets_checks_partitions_schedule_and_sensor():
    from corpusforge.graph import GRAPH
    from corpusforge_dagster.definitions import defs
    from corpusforge_dagster.resources import workspace_pool

    graph = defs.resolve_asset_graph()
    assert {name(k) for k in graph.get_all_asset_keys()} == ASSETS | {"spec"}
    assert {name(k) for k in graph.materializable_asset_keys} == ASSETS
    assert graph.get(key("spec")).is_observable  # the spec and its source, observed per partition
    assert {f"{name(k.asset_key)}:{k.name}" for k in graph.asset_check_keys} == CHECKS
    job = defs.resolve_job_def("corpusforge_build")
    assert job.partitions_def.get_partition_keys() == SPEC_STEMS
    assert {"demo", "scifact"} <= set(SPEC_STEMS)
    for k in graph.get_all_asset_keys():
        assert graph.get(k).partitions_def.get_partition_keys() == SPEC_STEMS
    # code versions come from the stage graph; every stage asset reads its spec
    for stage in GRAPH:
        for asset in stage.assets:
            node = graph.get(key(asset))
            assert node.code_version == str(stage.code_version), asset
            assert key("spec") in node.parent_keys, asset
    assert graph.get(key("documents")).code_version == "2"
    # Lineage, from the stage graph: the snapshot sits downstream of every stage, training included.
    assert graph.get(key("evaluation")).parent_keys == {key(k) for k in (
        "spec", "dense_index", "bm25_index", "dense_index_trained", "reranker_model")}
    assert graph.get(key("retriever_model")).parent_keys == {key("spec"), key("hard_negatives"),
                                                             key("training_pairs")}
    assert key("documents") in graph.get(key("quarantine")).parent_keys
    # one concurrency pool per workspace on every stage
    pools = {node.pool for node in job.graph.node_defs if node.name != "corpusforge__spec"}
    assert pools == {workspace_pool()}
    schedule = defs.resolve_schedule_def("nightly_build")
    assert schedule.cron_schedule == "0 2 * * *" and schedule.job_name == "corpusforge_build"
    sensor = defs.resolve_sensor_def("source_changed")
    assert sensor.job_name == "corpusforge_build"
    assert set(defs.resources) == {"storage", "tracking", "device", "ray_cluster"}


def test_dg_check_defs_loads_the_project_from_the_repository_root():
    """`dg` finds the project in pyproject.toml ([tool.dg]) and loads its definitions, no flags."""
    out = subprocess.run([str(Path(sys.executable).parent / "dg"), "check", "defs"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=offline_env(VIRTUAL_ENV=str(Path(sys.executable).parent.parent)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "All definitions loaded successfully" in out.stdout + out.stderr


def test_resources_and_pool_swap_per_environment(tmp_path):
    from corpusforge_dagster.resources import resources_from_env, workspace_pool

    local = resources_from_env({})
    assert local["storage"].workspace == "workspace" and local["storage"].publish_root is None
    assert local["storage"].workspace_path() == ROOT / "workspace"
    s3 = resources_from_env({"CORPUSFORGE_PUBLISH_ROOT": "s3://bucket/snapshots",
                             "CORPUSFORGE_MLFLOW_TRACKING_URI": "http://mlflow:5000", "CORPUSFORGE_DEVICE": "cuda"})
    # Bound as environment variables, resolved at run time (and shown so in the UI).
    assert s3["storage"].publish_root == dg.EnvVar("CORPUSFORGE_PUBLISH_ROOT")
    assert s3["tracking"].tracking_uri == dg.EnvVar("CORPUSFORGE_MLFLOW_TRACKING_URI")
    assert s3["device"].device == dg.EnvVar("CORPUSFORGE_DEVICE")
    # the same workspace, however spelled, is one pool; another workspace is another pool
    assert workspace_pool({}) == workspace_pool({"CORPUSFORGE_WORKSPACE": str(ROOT / "workspace")})
    assert workspace_pool({"CORPUSFORGE_WORKSPACE": str(tmp_path)}) != workspace_pool({})


def test_the_repository_dagster_yaml_lets_one_run_per_workspace_pool_in_progress(tmp_path):
    """`dagster dev` from the repository root (no DAGSTER_HOME) configures its instance from ./dagster.yaml."""
    from dagster._core.instance.ref import InstanceRef

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(tmp_path), config_dir=str(ROOT))) as instance:
        config = instance.get_concurrency_config()
        assert config.pool_config.default_pool_limit == 1
        assert config.pool_config.pool_granularity.value == "run"


def test_materialise_the_demo_graph_in_process():
    ws, result = dagster_build()
    assert result.success
    observed = [e.event_specific_data.asset_observation for e in result.all_events
                if e.event_type_value == "ASSET_OBSERVATION"]
    assert [(name(o.asset_key), o.partition) for o in observed] == [("spec", "demo")]
    mats = _materialisations(result)
    meta = _metadata(result)
    assert set(meta) == ASSETS
    # the demo spec does not train: the training branch reports itself disabled, nothing more
    assert {k: meta[k] for k in TRAIN_ASSETS} == {k: {"enabled": False, "stage": meta[k]["stage"]} for k in TRAIN_ASSETS}
    # data version = the stage's fingerprint; code version = the graph's
    assert mats["chunks"].tags["dagster/data_version"] == meta["chunks"]["fingerprint"]
    assert mats["documents"].tags["dagster/code_version"] == "2"

    # checks are partitioned: each result belongs to the spec it checked
    checks = {f"{name(c.asset_key)}:{c.check_name}": c for c in result.get_asset_check_evaluations()}
    assert set(checks) == CHECKS
    assert {k for k, c in checks.items() if "enabled" in c.metadata} == CHECKS - DEMO_CHECKS
    assert {c.partition for c in checks.values()} == {"demo"}
    assert all(c.passed for c in checks.values()), {k: c.metadata for k, c in checks.items() if not c.passed}
    assert checks["chunks:contract"].metadata["failed"].value == 0
    assert checks["chunks:contract"].metadata["expectations"].value == 10  # the whole suite, none skipped
    promotion = {k: v.value for k, v in checks["snapshot:promotion"].metadata.items()}
    assert promotion["rule"] == "always" and promotion["promoted"] is True
    assert promotion["reason"] == "publish.promote: always" and promotion["alias"] == "production"

    m = manifest(ws)
    ids = chunk_ids(ws)
    assert meta["documents"]["rows"] == 41 and meta["documents_clean"]["rows"] == 41
    assert meta["quarantine"]["dagster/row_count"] == 0 and meta["documents"]["quarantined"] == 0
    assert meta["documents_clean"]["dagster/row_count"] == 41 and meta["chunks"]["dagster/row_count"] == len(ids)
    assert meta["chunks"]["rows"] == meta["embeddings"]["rows"] == len(ids) == len(set(ids)) > 41
    assert meta["dense_index"]["dense/ntotal"] == meta["bm25_index"]["bm25/num_docs"] == len(ids)
    # standard metadata: the column schema from the Arrow schema, the dataset's and the snapshot's URIs
    from corpusforge.data.schemas import CHUNKS, QUARANTINE

    columns = {c.name: c for c in meta["chunks"]["dagster/column_schema"].columns}
    assert list(columns) == CHUNKS.names
    assert columns["n_tokens"].type == "int32" and columns["acl"].type == "list<string>"
    assert columns["chunk_id"].constraints.nullable is False
    assert [c.name for c in meta["quarantine"]["dagster/column_schema"].columns] == QUARANTINE.names
    vectors = {c.name: c.type for c in meta["embeddings"]["dagster/column_schema"].columns}
    assert vectors == {"chunk_id": "string", "vector": "list<float>[384]"}
    assert meta["chunks"]["dagster/uri"] == (ws / "demo" / "chunks").resolve().as_uri()
    assert meta["snapshot"]["dagster/uri"] == snapshot_dir(ws).resolve().as_uri()
    # a link to the stage's MLflow run, in the spec's experiment
    import mlflow

    run = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").get_run(meta["evaluation"]["mlflow_run_id"])
    assert run.data.tags["corpusforge.stage"] == "evaluate"
    assert meta["evaluation"]["mlflow_run"] == (f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}"
                                                f"/runs/{run.info.run_id}")
    # metrics rounded to 4 decimals
    floats = [v for v in meta["evaluation"].values() if isinstance(v, float)]
    assert floats and all(round(v, 4) == v for v in floats)
    for mode, metrics in m["metrics"].items():
        assert meta["evaluation"][f"test/{mode}/ndcg_10"] == pytest.approx(metrics["ndcg@10"], abs=5e-5)
        assert meta["evaluation"][f"test/{mode}/latency_ms_p50"] > 0
    assert meta["snapshot"]["corpus_hash"] == m["corpus_hash"]
    assert snapshot_dir(ws).name == meta["snapshot"]["version"]
    assert (snapshot_dir(ws) / "manifest.json").exists()


def test_an_unchanged_rebuild_records_nothing_and_versions_show_what_is_stale(tmp_path, monkeypatch):
    ws, _ = dagster_build()
    assert set(_statuses().values()) == {"FRESH"}
    again = dagster_job(ws).execute_in_process(partition_key="demo", instance=dagster_instance())
    assert again.success
    # no new materialisation, no new check result: Dagster already shows every asset up to date
    assert _metadata(again) == {} and again.get_asset_check_evaluations() == []
    assert set(_statuses().values()) == {"FRESH"}

    # a new code version of a stage marks its assets stale
    from dataclasses import replace

    from corpusforge.graph import GRAPH
    from corpusforge_dagster import assets as cf_assets
    from corpusforge_dagster.resources import workspace_pool

    bumped = [cf_assets.spec] + [cf_assets._stage_asset(replace(s, code_version=s.code_version + 1)
                                                        if s.name == "chunk" else s, workspace_pool()) for s in GRAPH]
    statuses = _statuses(bumped)
    assert statuses["chunks"] == "STALE" and statuses["documents"] == "FRESH"

    # a changed source (observed) marks every asset of the spec stale
    import corpusforge_dagster.partitions as partitions

    source = tmp_path / "corpus"
    shutil.copytree(ROOT / "examples" / "demo", source)
    spec = tmp_path / "demo.yaml"
    spec.write_text((ROOT / "pipelines" / "demo.yaml").read_text().replace("../examples/demo", str(source)))
    monkeypatch.setitem(partitions.SPEC_PATHS, "demo", spec)
    observe = dagster_job(ws).execute_in_process(partition_key="demo", instance=dagster_instance(),
                                                  asset_selection=[key("spec")])
    assert observe.success
    statuses = _statuses()
    assert statuses["documents"] == statuses["chunks"] == statuses["snapshot"] == "STALE"


def test_publishing_to_s3_by_configuration(s3_server, s3_bucket):
    from corpusforge.snapshots import SnapshotStore

    built, _ = dagster_build()
    ws = scratch() / "dagster-s3"
    shutil.copytree(built, ws)  # the built stages are reused; only publishing changes
    root = f"s3://{s3_bucket}/snapshots"
    job = dagster_job(ws, publish_root=root, s3_endpoint_url=s3_server["endpoint_url"])
    result = job.execute_in_process(partition_key="demo", instance=dg.DagsterInstance.ephemeral(),
                                    asset_selection=[key("snapshot")])
    meta = _metadata(result)["snapshot"]
    assert meta["skipped"] is False and meta["root"] == root
    store = SnapshotStore(root, endpoint_url=s3_server["endpoint_url"])
    assert store.resolve("demo", "production") == meta["version"]
    assert store.verify("demo", meta["version"]).ok
    assert meta["dagster/uri"] == f"{root}/demo/{meta['version']}"
    assert {c.check_name: c.passed for c in result.get_asset_check_evaluations()} == {"verified": True,
                                                                                     "promotion": True}


def test_schedule_requests_one_run_per_spec():
    from corpusforge_dagster.jobs import nightly_build

    ctx = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 1, 2, 2, 0))
    requests = nightly_build(ctx)
    assert sorted(r.partition_key for r in requests) == SPEC_STEMS
    assert {r.run_key for r in requests} == {f"{s}-2026-01-02" for s in SPEC_STEMS}


def test_sensor_starts_a_run_when_a_source_changes(tmp_path, monkeypatch):
    import corpusforge_dagster.jobs as build

    source = tmp_path / "corpus"
    shutil.copytree(ROOT / "examples" / "demo", source)
    spec = tmp_path / "watched.yaml"
    spec.write_text((ROOT / "pipelines" / "demo.yaml").read_text().replace("../examples/demo", str(source)))
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\nsource: {format: beir, path: /nonexistent/corpus}\n")
    monkeypatch.setattr(build, "SPEC_PATHS", {"watched": spec, "broken": broken})

    first = build.source_changed(dg.build_sensor_context())
    assert first.run_requests == [] and "watched" in json.loads(first.cursor)
    unchanged = build.source_changed(dg.build_sensor_context(cursor=first.cursor))
    assert unchanged.run_requests == [] and unchanged.cursor == first.cursor
    with (source / "corpus.jsonl").open("a") as f:
        f.write(json.dumps({"_id": "new", "title": "New", "text": "A document added later."}) + "\n")
    changed = build.source_changed(dg.build_sensor_context(cursor=first.cursor))
    assert [r.partition_key for r in changed.run_requests] == ["watched"]
    fingerprint = json.loads(changed.cursor)["watched"]
    assert fingerprint != json.loads(first.cursor)["watched"]
    assert changed.run_requests[0].run_key == f"watched-{fingerprint}"
    again = build.source_changed(dg.build_sensor_context(cursor=changed.cursor))
    assert again.run_requests == []




@pytest.mark.slow  # 1-3 min (webserver + daemons on 2 cores); `dg check defs` above loads the same project
def test_dg_dev_serves_the_project_from_the_repository_root_with_no_flags():
    """`dg dev` (as a user types it, plus host and port) finds the project, starts the webserver on the
    repository's instance settings (./dagster.yaml: one run per workspace pool) and serves the graph."""
    port = free_port()
    env = offline_env(VIRTUAL_ENV=str(Path(sys.executable).parent.parent))
    env.pop("DAGSTER_HOME", None)  # the default: a temporary instance configured from ./dagster.yaml
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dg"), "dev", "-h", "127.0.0.1", "-p", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: dg starts dagster dev and its servers
    url = f"http://127.0.0.1:{port}/graphql"
    query = ("{ assetNodes { assetKey { path } dependencyKeys { path } partitionKeys } "
             "instance { poolConfig { poolGranularity defaultPoolLimit } } }")
    try:
        deadline, data = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                reply = httpx.post(url, json={"query": query}, timeout=10)
                if reply.status_code == 200 and reply.json().get("data", {}).get("assetNodes"):
                    data = reply.json()["data"]
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        assert data is not None, f"dg dev did not answer (exit code {proc.poll()})"
        # Interrupted while its daemon is still starting, `dagster dev` leaves its temporary instance
        # behind (seen in a fresh clone, where the first start is slow): stop it once the daemons run.
        health = "{ instance { daemonHealth { allDaemonStatuses { healthy } } } }"
        while time.monotonic() < deadline + 120:
            statuses = httpx.post(url, json={"query": health}, timeout=10).json()["data"]["instance"][
                "daemonHealth"]["allDaemonStatuses"]
            if statuses and all(d["healthy"] for d in statuses):
                break
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # a graceful stop removes its temporary instance folder
        try:
            out, _ = proc.communicate(timeout=180)  # a loaded 2-core machine stops dg dev slowly
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
    assert set(nodes) == {f"corpusforge/{a}" for a in ASSETS | {"spec"}}, out[-2000:]
    deps = {k.split("/")[1]: {"/".join(d["path"]).split("/")[1] for d in n["dependencyKeys"]}
            for k, n in nodes.items()}
    assert deps["snapshot"] == {"spec", "evaluation"} and deps["chunks"] == {"spec", "documents_clean", "quarantine"}
    assert deps["evaluation"] == {"spec", "dense_index", "bm25_index", "dense_index_trained", "reranker_model"}
    assert all(n["partitionKeys"] == SPEC_STEMS for n in nodes.values())
    assert data["instance"]["poolConfig"] == {"poolGranularity": "run", "defaultPoolLimit": 1}
    assert not list(ROOT.glob(".tmp_dagster_home_*"))


_RAY_BUILD = """
import json, sys
import dagster as dg
from corpusforge_dagster.assets import ASSETS
from corpusforge_dagster.jobs import build_job
from corpusforge_dagster.resources import DeviceResource, StorageResource, TrackingResource, local_ray

defs = dg.Definitions(assets=ASSETS, jobs=[build_job], resources={
    "storage": StorageResource(workspace=sys.argv[1]), "tracking": TrackingResource(), "device": DeviceResource(),
    "ray_cluster": local_ray()})
instance = dg.DagsterInstance.ephemeral()
result = defs.resolve_job_def("corpusforge_build").execute_in_process(
    partition_key="demo-ray", instance=instance, raise_on_error=False)
# context.log lines are records of the run's event log, not events of the result
logs = [r.user_message or "" for r in instance.all_logs(result.run_id)]
print(json.dumps({"success": result.success,
                  "on_resource": sorted({m.split(":")[0] for m in logs if "on the Ray of resource" in m})}))
"""


@pytest.mark.slow  # ~5 min on 2 cores (a Ray started per build); `make test-all`. The Ray engine itself is
# in the default suite (tests/engines/test_ray.py).
def test_a_ray_spec_runs_its_stages_on_the_dagster_ray_resource(tmp_path):
    """`execution.engine: ray` without an address: the assets connect dagster-ray's LocalRay and the
    stages run on it; the snapshot's content is the local CLI build's."""
    import yaml

    from tests.orchestration_runs import content_digests, offline_env

    spec = yaml.safe_load((ROOT / "pipelines" / "demo.yaml").read_text())
    spec["source"]["path"] = str((ROOT / "pipelines" / spec["source"]["path"]).resolve())
    spec.update(name="demo-ray", execution={"engine": "ray", "rows_per_task": 16})
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "demo-ray.yaml").write_text(yaml.safe_dump(spec))
    ws = tmp_path / "ws"
    out = subprocess.run([sys.executable, "-c", _RAY_BUILD, str(ws)], capture_output=True, text=True, cwd=ROOT,
                         env=offline_env(CORPUSFORGE_PIPELINES_DIR=str(tmp_path / "pipelines"),
                                         RAY_ADDRESS="local"),  # a Ray of its own, never one already running
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["success"], out.stderr[-3000:]
    assert "Deleted LocalRay" in out.stderr  # the resource's Ray ends with the run
    assert {"demo-ray extract", "demo-ray embed", "demo-ray index"} <= set(report["on_resource"])
    # The same spec file on the local engine (the same name, source path and rows per task: the
    # stage fingerprints and the chunk files depend on them; the engine is in no fingerprint).
    local = tmp_path / "local"
    cli = subprocess.run([sys.executable, "-m", "corpusforge.cli", "run", str(tmp_path / "pipelines" / "demo-ray.yaml"),
                          "-w", str(local), "--engine", "local"], capture_output=True, text=True, cwd=ROOT,
                         env=offline_env(), timeout=900)
    assert cli.returncode == 0, cli.stderr[-3000:]
    # Every file but the chunk store's is byte-equal. The chunk store holds the same rows in the same
    # order, in one file per input fragment on Ray (16 rows per task here) and in one file locally,
    # and its metadata records the engine.
    on_ray, here = ({k: v for k, v in content_digests(w, "demo-ray").items() if not k.startswith("chunks/")}
                    for w in (ws, local))
    assert on_ray == here and {"dense/dense.json", "bm25/bm25.json"} <= set(here)
    folders = [next((w / "snapshots" / "demo-ray").glob("*/chunks")) for w in (ws, local)]
    assert datasets.read_table(folders[0]).equals(datasets.read_table(folders[1]))
    metas = [json.loads((f / "_dataset.json").read_text()) for f in folders]
    assert metas[0].pop("engine") == "ray" and metas[1].pop("engine", None) is None and metas[0] == metas[1]
