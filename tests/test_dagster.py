"""The Dagster shell: definitions, an in-process materialisation of the demo graph, the webserver's
GraphQL API, per-environment resources (S3 publishing), the schedule and the source sensor."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import dagster as dg
import httpx
import pytest

from orchestration_runs import ROOT, chunk_ids, dagster_build, manifest, offline_env, scratch, snapshot_dir

DATA_ASSETS = {"documents", "documents_clean", "quarantine", "chunks", "embeddings", "dense_index", "bm25_index",
               "evaluation", "snapshot"}
TRAIN_ASSETS = {"hard_negatives", "training_pairs", "retriever_model", "embeddings_trained", "dense_index_trained",
                "reranker_model"}
ASSETS = DATA_ASSETS | TRAIN_ASSETS
CHECKS = {"documents:contract", "documents_clean:contract", "quarantine:contract", "chunks:contract",
          "embeddings:contract", "hard_negatives:contract", "training_pairs:contract", "embeddings_trained:contract",
          "snapshot:verified"}
SPEC_STEMS = sorted(p.stem for p in (ROOT / "pipelines").glob("*.yaml"))


def _metadata(result: dg.ExecuteInProcessResult) -> dict[str, dict]:
    """{asset key: {metadata name: value}} of a run's materialisations."""
    out = {}
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        assert mat.partition == "demo"
        out[mat.asset_key.to_user_string()] = {k: v.value for k, v in mat.metadata.items()}
    return out


def test_definitions_list_assets_checks_partitions_schedule_and_sensor():
    from assets.definitions import defs

    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == ASSETS
    assert {k.to_user_string() for k in graph.asset_check_keys} == CHECKS
    job = defs.resolve_job_def("corpusforge_build")
    assert job.partitions_def.get_partition_keys() == SPEC_STEMS
    assert {"demo", "scifact"} <= set(SPEC_STEMS)
    for key in graph.get_all_asset_keys():
        assert graph.get(key).partitions_def.get_partition_keys() == SPEC_STEMS
    # Lineage, from the stage graph: the snapshot sits downstream of every stage, training included.
    assert graph.get(dg.AssetKey("evaluation")).parent_keys == {dg.AssetKey(k) for k in (
        "dense_index", "bm25_index", "dense_index_trained", "reranker_model")}
    assert graph.get(dg.AssetKey("retriever_model")).parent_keys == {dg.AssetKey("hard_negatives"),
                                                                     dg.AssetKey("training_pairs")}
    assert dg.AssetKey("documents") in graph.get(dg.AssetKey("quarantine")).parent_keys
    schedule = defs.resolve_schedule_def("nightly_build")
    assert schedule.cron_schedule == "0 2 * * *" and schedule.job_name == "corpusforge_build"
    sensor = defs.resolve_sensor_def("source_changed")
    assert sensor.job_name == "corpusforge_build"
    assert set(defs.resources) == {"storage", "tracking", "device"}


def test_resources_swap_per_environment():
    from assets.resources import resources_from_env

    local = resources_from_env({})
    assert local["storage"].workspace == "workspace" and local["storage"].publish_root is None
    assert local["storage"].workspace_path() == ROOT / "workspace"
    s3 = resources_from_env({"CORPUSFORGE_PUBLISH_ROOT": "s3://bucket/snapshots",
                             "CORPUSFORGE_MLFLOW_TRACKING_URI": "http://mlflow:5000", "CORPUSFORGE_DEVICE": "cuda"})
    # Bound as environment variables, resolved at run time (and shown so in the UI).
    assert s3["storage"].publish_root == dg.EnvVar("CORPUSFORGE_PUBLISH_ROOT")
    assert s3["tracking"].tracking_uri == dg.EnvVar("CORPUSFORGE_MLFLOW_TRACKING_URI")
    assert s3["device"].device == dg.EnvVar("CORPUSFORGE_DEVICE")


def test_materialise_the_demo_graph_in_process():
    ws, result = dagster_build()
    assert result.success
    meta = _metadata(result)
    assert set(meta) == ASSETS
    # the demo spec does not train: the training branch reports itself disabled, nothing more
    assert {k: meta[k] for k in TRAIN_ASSETS} == {k: {"enabled": False, "stage": meta[k]["stage"]} for k in TRAIN_ASSETS}
    checks = {c.asset_check_key.to_user_string(): c for c in result.get_asset_check_evaluations()}
    assert set(checks) == CHECKS
    assert all(c.passed for c in checks.values()), {k: c.metadata for k, c in checks.items() if not c.passed}
    assert checks["chunks:contract"].metadata["failed"].value == 0
    assert checks["chunks:contract"].metadata["expectations"].value == 10  # the whole suite, none skipped

    m = manifest(ws)
    ids = chunk_ids(ws)
    assert meta["documents"]["rows"] == 41 and meta["documents_clean"]["rows"] == 41
    assert meta["quarantine"]["dagster/row_count"] == 0 and meta["documents"]["quarantined"] == 0
    assert meta["documents_clean"]["dagster/row_count"] == 41 and meta["chunks"]["dagster/row_count"] == len(ids)
    assert meta["chunks"]["rows"] == meta["embeddings"]["rows"] == len(ids) == len(set(ids)) > 41
    assert meta["dense_index"]["dense/ntotal"] == meta["bm25_index"]["bm25/num_docs"] == len(ids)
    for mode, metrics in m["metrics"].items():
        assert meta["evaluation"][f"test/{mode}/ndcg@10"] == pytest.approx(metrics["ndcg@10"])
        assert meta["evaluation"][f"test/{mode}/latency_ms_p50"] > 0
    assert meta["snapshot"]["corpus_hash"] == m["corpus_hash"]
    assert snapshot_dir(ws).name == meta["snapshot"]["version"]
    assert (snapshot_dir(ws) / "manifest.json").exists()


def test_a_second_materialisation_skips_every_stage():
    ws, _ = dagster_build()
    from assets.resources import DeviceResource, StorageResource, TrackingResource
    from assets.stages import STAGE_ASSETS

    again = dg.materialize(STAGE_ASSETS, partition_key="demo", instance=dg.DagsterInstance.ephemeral(),
                           resources={"storage": StorageResource(workspace=str(ws)), "tracking": TrackingResource(),
                                      "device": DeviceResource()}, selection=["documents", "documents_clean",
                                                                             "quarantine", "chunks"])
    meta = _metadata(again)
    assert {meta[k]["skipped"] for k in ("documents", "documents_clean", "chunks")} == {True}
    assert meta["chunks"]["rows"] == len(chunk_ids(ws))


def test_publishing_to_s3_by_configuration(s3_server, s3_bucket):
    from assets.resources import DeviceResource, StorageResource, TrackingResource
    from assets.stages import STAGE_ASSETS
    from corpusforge.snapshots import SnapshotStore

    built, _ = dagster_build()
    ws = scratch() / "dagster-s3"
    shutil.copytree(built, ws)  # the built stages are reused; only publishing changes
    root = f"s3://{s3_bucket}/snapshots"
    storage = StorageResource(workspace=str(ws), publish_root=root, s3_endpoint_url=s3_server["endpoint_url"])
    result = dg.materialize(STAGE_ASSETS, partition_key="demo", instance=dg.DagsterInstance.ephemeral(),
                            resources={"storage": storage, "tracking": TrackingResource(), "device": DeviceResource()},
                            selection=["snapshot"])
    meta = _metadata(result)["snapshot"]
    assert meta["skipped"] is False and meta["root"] == root
    store = SnapshotStore(root, endpoint_url=s3_server["endpoint_url"])
    assert store.resolve("demo", "production") == meta["version"]
    assert store.verify("demo", meta["version"]).ok
    assert [c.passed for c in result.get_asset_check_evaluations()] == [True]


def test_schedule_requests_one_run_per_spec():
    from jobs.build import nightly_build

    ctx = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 1, 2, 2, 0))
    requests = nightly_build(ctx)
    assert sorted(r.partition_key for r in requests) == SPEC_STEMS
    assert {r.run_key for r in requests} == {f"{s}-2026-01-02" for s in SPEC_STEMS}


def test_sensor_starts_a_run_when_a_source_changes(tmp_path, monkeypatch):
    import jobs.build as build

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_webserver_serves_the_asset_graph_over_graphql(tmp_path):
    port = _free_port()
    home = tmp_path / "dagster_home"
    home.mkdir()
    exe = Path(sys.executable).parent / "dagster-webserver"
    proc = subprocess.Popen([str(exe), "-m", "assets.definitions", "-h", "127.0.0.1", "-p", str(port)],
                            cwd=ROOT, env=offline_env(DAGSTER_HOME=str(home), PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/graphql"
    query = "{ assetNodes { assetKey { path } dependencyKeys { path } partitionKeys } }"
    try:
        deadline, data = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                reply = httpx.post(url, json={"query": query}, timeout=10)
                if reply.status_code == 200 and reply.json().get("data", {}).get("assetNodes"):
                    data = reply.json()["data"]
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        assert data is not None, f"webserver did not answer (exit code {proc.poll()})"
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
    assert set(nodes) == ASSETS, out[-2000:]
    deps = {k: {"/".join(d["path"]) for d in n["dependencyKeys"]} for k, n in nodes.items()}
    assert deps["snapshot"] == {"evaluation"} and deps["chunks"] == {"documents_clean", "quarantine"}
    assert deps["evaluation"] == {"dense_index", "bm25_index", "dense_index_trained", "reranker_model"}
    assert all(n["partitionKeys"] == SPEC_STEMS for n in nodes.values())
