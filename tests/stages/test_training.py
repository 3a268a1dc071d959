"""The training branch of the stage graph at demo size (pipelines/demo-train.yaml): mine, fit the
bi-encoder, re-embed, re-index, fit the reranker, evaluate, publish with a gated promotion.

The module inspects the session's CLI build of the spec (`tests.orchestration_runs.cli_build`,
which tests/orchestration/test_airflow.py also builds through Dagster and Airflow and finds
byte-equal, trained models included: reproducible training); a forced republish with an equal dev
score must not move `production`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow.compute as pc
import pytest

from corpusforge.data import datasets
from corpusforge.pipeline import Pipeline
from corpusforge.snapshots.build import index_name, store_for
from corpusforge.spec import load_spec
from tests.orchestration_runs import cli_build

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "pipelines" / "demo-train.yaml"
TRAINING = ["mine", "train_retriever", "embed_trained", "index_trained", "train_reranker"]


# the session's demo-train builds (CLI, Dagster, Airflow) are shared with test_airflow.py: one worker
pytestmark = pytest.mark.xdist_group("demo-builds")


@pytest.fixture(scope="module")
def built():
    """The CLI build of demo-train: (workspace, its pipeline, {stage: recorded outcome})."""
    ws = cli_build("demo-train")
    pipeline = Pipeline(load_spec(SPEC), workspace=ws, progress=False)
    results = {stage: SimpleNamespace(summary=pipeline.ws.read_state(stage)["summary"]) for stage in pipeline.stages()}
    return ws, pipeline, results


def test_the_whole_graph_trains_registers_and_publishes_a_self_contained_snapshot(built):
    ws, pipeline, results = built
    assert list(results) == pipeline.stages() and set(TRAINING) <= set(results)
    bi, rr = results["train_retriever"].summary, results["train_reranker"].summary
    assert bi["steps"] == bi["planned_steps"] > 0 and bi["truncated"] is False
    assert rr["steps"] == rr["planned_steps"] > 0 and rr["truncated"] is False
    assert bi["registry"]["name"] == "demo-train-biencoder" and rr["registry"]["name"] == "demo-train-colbert"
    assert 0 <= rr["fusion_weight"] <= 1

    # the training datasets passed their contracts inside the stage; dev is held out of the pairs
    pairs = datasets.read_table(pipeline.ws.train_dir / "training_pairs")
    test_qids = {line.split("\t")[0] for line in (ROOT / "examples/train-demo/qrels/test.tsv").read_text().splitlines()[1:]}
    assert not set(pairs.column("query_id").to_pylist()) & test_qids
    assert set(pc.unique(pairs.column("split")).to_pylist()) == {"train", "dev"}
    negatives = datasets.read_table(pipeline.ws.train_dir / "hard_negatives")
    assert negatives.num_rows > 0

    evaluate = results["evaluate"].summary
    assert {"hybrid+rerank", "dense+rerank"} <= set(evaluate["modes"]) and evaluate["trained"] is True
    assert {"bm25", "dense", "hybrid", "hybrid+rerank"} <= set(evaluate["dev"]["modes"])

    publish = results["publish"].summary
    assert publish["promoted"] is True  # the first build of the index
    store, name = store_for(pipeline.spec, pipeline.ws), index_name(pipeline.spec)
    assert store.resolve(name, "production") == store.resolve(name, "candidate") == publish["version"]
    manifest = store.manifest(name, publish["version"])
    paths = {f["path"] for f in manifest["files"]}
    assert any(p.startswith("model/") for p in paths) and any(p.startswith("reranker/") for p in paths)
    assert manifest["model"]["config"]["name"] == "model"  # never a path into the workspace
    assert manifest["extra"]["training"]["truncated"] is False
    assert manifest["extra"]["dev"]["modes"]["dense"]["ndcg@10"] == evaluate["dev"]["modes"]["dense"]["ndcg@10"]

    from corpusforge.retrieval.search import UNRESTRICTED
    from corpusforge.serve.loader import open_snapshot

    snap = open_snapshot(ws / "snapshots" / name / publish["version"], query_runtime="torch")
    assert snap.reranker is not None
    hits = snap.searcher.search("tell me about penguins please, what do you know about penguins", k=3,
                                mode="dense", acl=UNRESTRICTED)
    assert hits[0].doc_id == "pos24"  # the summary, not the parrot: the trained encoder serves


def test_the_registered_champions_load_through_mlflow_and_score(built, capsys):
    import mlflow
    import numpy as np
    import pandas as pd
    from sentence_transformers import SentenceTransformer

    from corpusforge.encoding.models import resolve_model_path
    from corpusforge.retrieval.rerank import Reranker

    ws, pipeline, results = built
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    try:
        encoder = mlflow.sentence_transformers.load_model("models:/demo-train-biencoder@champion")
        reranker = mlflow.pyfunc.load_model("models:/demo-train-colbert@champion")
        client = mlflow.MlflowClient()
        version = results["train_retriever"].summary["registry"]["version"]
        run = client.get_run(client.get_model_version("demo-train-biencoder", version).run_id)
    finally:
        mlflow.set_tracking_uri(previous)
    query = "tell me about penguins please, what do you know about penguins"
    summary, parrot = "Summary. Flightless seabirds swim with flipper-like wings.", \
        "tell me about penguins please, what do you know about penguins ? tell me more."
    q, docs = encoder.encode([query]), encoder.encode([summary, parrot])
    with capsys.disabled():  # quoted in the README: the registered bi-encoder encoding a query
        print(f"\nmodels:/demo-train-biencoder@champion -> {type(encoder).__name__}, "
              f"encode([{query!r}]) -> shape {q.shape}, first values {np.round(q[0, :4], 4).tolist()}")
    # the trained encoder itself: the workspace model's vectors (unit length), not the base model's
    assert np.allclose(q, SentenceTransformer(str(pipeline.ws.trained_model_dir), device="cpu").encode([query]),
                       atol=1e-5)
    assert np.allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-4)
    base = SentenceTransformer(str(resolve_model_path("default")), device="cpu").encode([query])
    assert not np.allclose(q, base, atol=1e-3)
    pairs = pd.DataFrame({"query": [query, query], "passage": [summary, parrot]})
    scores = reranker.predict(pairs)["score"].to_numpy()
    direct = Reranker(pipeline.ws.reranker_model_dir, device="cpu").scores(query, [_Text(summary), _Text(parrot)])
    assert np.allclose(scores, direct, atol=1e-4)
    # the dev scores that decided the champions are metrics of the training run
    assert run.data.metrics["biencoder/dev/ndcg_10"] == results["train_retriever"].summary["best_dev"]
    assert run.data.metrics["colbert/dev/ndcg_10"] == \
        results["train_reranker"].summary["dev"]["hybrid+rerank"]


class _Text:
    chunk_id = None

    def __init__(self, text: str):
        self.text = text


def test_an_unchanged_rerun_skips_every_stage_training_included(built):
    ws, pipeline, results = built
    again = Pipeline(load_spec(SPEC), workspace=ws, progress=False).run()
    assert all(r.skipped for r in again)
    assert [r.summary for r in again] == [results[r.stage].summary for r in again]


def test_a_forced_republish_with_an_equal_dev_score_does_not_move_production(built, tmp_path):
    ws, pipeline, results = built
    copy = tmp_path / "ws"
    shutil.copytree(ws, copy)
    forced = Pipeline(load_spec(SPEC), workspace=copy, progress=False, force=True)
    publish = forced.run_stage("publish").summary
    # Promotion belongs to publish: equal dev is no improvement, so production stays; candidate moves.
    store, name = store_for(forced.spec, forced.ws), index_name(forced.spec)
    assert publish["promoted"] is False and "<=" in publish["promotion"]
    assert store.resolve(name, "production") == results["publish"].summary["version"]
    assert store.resolve(name, "candidate") == publish["version"] != results["publish"].summary["version"]
    digests = {json.dumps(sorted((f["path"], f["sha256"]) for f in store.manifest(name, v)["files"]
                                 if not f["path"].startswith("eval/")))
               for v in (publish["version"], results["publish"].summary["version"])}
    assert len(digests) == 1  # the two snapshots' content files are byte-equal
