"""MLflow registry: trained models become loadable, registered versions; `champion` moves only when dev improves."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from corpusforge.encoding.models import resolve_model_path
from corpusforge.tracking.tracker import RunTracker
from corpusforge.train.registry import CHAMPION, champion_dev, promote_if_better, register_model, register_version


def test_champion_moves_only_when_dev_improves(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcomes = []
    for dev in (0.50, 0.45, 0.50, 0.62):
        with RunTracker(uri, "train-test", run_name=f"dev-{dev}") as t:
            version = register_version(t.client, "tiny-biencoder", (tmp_path / "model").as_uri(), t.run_id, dev)
            outcomes.append(promote_if_better(t.client, "tiny-biencoder", version, dev))
    assert [o.version for o in outcomes] == ["1", "2", "3", "4"]
    assert [o.promoted for o in outcomes] == [True, False, False, True]  # equal is not better
    assert [o.champion for o in outcomes] == ["1", "1", "1", "4"]
    client = t.client
    assert str(client.get_model_version_by_alias("tiny-biencoder", CHAMPION).version) == "4"
    assert champion_dev(client, "tiny-biencoder") == ("4", 0.62)
    assert champion_dev(client, "no-such-model") == (None, None)


class _Hit:
    chunk_id = None

    def __init__(self, text: str):
        self.text = text


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """An untrained copy of the packaged encoder and an untrained reranker, logged and registered."""
    from corpusforge.retrieval.late_interaction import ColBERTConfig, LateInteraction

    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    reranker_dir = LateInteraction(ColBERTConfig(dim=16, query_length=16, doc_length=32, device="cpu")).save(
        tmp / "reranker")
    with RunTracker(uri, "flavors", run_name="train") as t:
        bi = register_model(t, resolve_model_path("default"), "tiny-biencoder", 0.5, kind="biencoder",
                            params={"epochs": 2}, metric="biencoder/dev/ndcg_10")
        rr = register_model(t, reranker_dir, "tiny-colbert", 0.25, kind="reranker", metric="colbert/dev/ndcg_10")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # how a user loads `models:/...`
    yield t, bi, rr, reranker_dir
    mlflow.set_tracking_uri(previous)


def test_the_biencoder_loads_from_the_registry_with_the_sentence_transformers_flavor(registered):
    from sentence_transformers import SentenceTransformer

    t, bi, _, _ = registered
    assert bi.version == "1" and bi.promoted and bi.model_uri.startswith("models:/m-")
    model = mlflow.sentence_transformers.load_model("models:/tiny-biencoder@champion")
    vectors = model.encode(["vitamin D and bone health", "vitamin D and bones", "how volcanoes erupt"],
                           normalize_embeddings=True)
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # it encodes meaning, not noise
    reference = SentenceTransformer(str(resolve_model_path("default")), device="cpu")
    assert np.allclose(vectors, reference.encode(["vitamin D and bone health", "vitamin D and bones",
                                                  "how volcanoes erupt"], normalize_embeddings=True), atol=1e-5)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-biencoder@champion")
    assert pyfunc.predict(["vitamin D"]).shape == (1, 384)
    info = mlflow.models.get_model_info("models:/tiny-biencoder@champion")
    assert info.signature.inputs.input_types()[0].name == "string"
    assert info.signature.outputs.inputs[0].shape == (-1, 384)
    assert info.saved_input_example_info is not None


def test_the_reranker_loads_from_the_registry_as_a_pyfunc_that_scores_pairs(registered):
    from corpusforge.retrieval.rerank import Reranker

    t, _, rr, reranker_dir = registered
    model = mlflow.pyfunc.load_model("models:/tiny-colbert@champion")
    pairs = pd.DataFrame({"query": ["what causes the tides", "what causes the tides", "how bread rises"],
                          "passage": ["The moon's gravity lifts the oceans.", "Yeast makes dough rise.",
                                      "Yeast makes dough rise."]})
    scores = model.predict(pairs)
    assert list(scores.columns) == ["score"] and len(scores) == 3 and np.isfinite(scores["score"]).all()
    # the scores the endpoint's Reranker gives the same texts
    direct = Reranker(reranker_dir, device="cpu")
    hits = [_Hit(p) for p in pairs["passage"][:2]]
    assert np.allclose(scores["score"][:2], direct.scores("what causes the tides", hits), atol=1e-4)
    info = mlflow.models.get_model_info("models:/tiny-colbert@champion")
    assert [c.name for c in info.signature.inputs.inputs] == ["query", "passage"]
    assert [c.name for c in info.signature.outputs.inputs] == ["score"]
    with pytest.raises(Exception, match="passage"):
        model.predict(pd.DataFrame({"query": ["only a query"]}))
    assert rr.version == "1" and rr.champion == "1"


def test_dev_scores_are_run_metrics_linked_to_the_logged_models(registered):
    t, bi, rr, _ = registered
    run = t.client.get_run(t.run_id)
    assert run.data.metrics["biencoder/dev/ndcg_10"] == 0.5 and run.data.metrics["colbert/dev/ndcg_10"] == 0.25
    models = {m.model_id: m for m in t.client.search_logged_models(experiment_ids=[t.experiment_id])}
    bi_model = models[bi.model_uri.removeprefix("models:/")]
    assert [(m.key, m.value) for m in bi_model.metrics] == [("biencoder/dev/ndcg_10", 0.5)]
    assert bi_model.source_run_id == t.run_id and bi_model.params == {"epochs": "2"}
    assert {o.model_id for o in run.outputs.model_outputs} == set(models)
    mv = t.client.get_model_version("tiny-colbert", "1")
    assert mv.source == rr.model_uri and mv.tags["dev_ndcg_10"] == "0.25"
