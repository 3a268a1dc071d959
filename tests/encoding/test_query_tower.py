"""The distilled query tower: training texts, distillation, reuse, and the pipeline -> snapshot -> serve path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from corpusforge.cli import stage_details
from corpusforge.encoding.encoder import Encoder
from corpusforge.pipeline import Pipeline
from corpusforge.encoding.query_tower import (TOWER_FILE, build_query_tower, distill, read_tower_info, tower_key,
                                     tower_model_config, training_sentences)
from corpusforge.serve.loader import open_snapshot
from corpusforge.spec import ModelConfig, QueryTowerConfig, load_spec
from corpusforge.train.core import TrainingBudgetExceeded

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo" / "corpus.jsonl"
FAST = {"steps": 40, "batch_size": 8, "learning_rate": 5e-4, "holdout": 12, "max_length": 48, "seed": 3}


def demo_texts() -> list[str]:
    return [json.loads(line)["text"] for line in DEMO.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def teacher() -> Encoder:
    return Encoder(ModelConfig(precision="fp32"))


def test_training_sentences_are_distinct_bounded_spans():
    texts = ["One two three four. Five six seven eight nine! Short one. One two three four.",
             "A b c d e f g h i j k l m n o p q r s t u v w x y z " * 4 + ". Tail words here now?"]
    got = training_sentences(texts, min_words=4, max_words=30)
    assert got == sorted(set(got))
    assert "One two three four." in got and "Five six seven eight nine!" in got
    assert "Short one." not in got                       # under min_words
    assert all(len(s.split()) <= 30 for s in got)        # the 104-word run-on span is dropped
    assert "Tail words here now?" in got


def test_distilled_tower_is_shallower_and_follows_the_teacher(teacher, tmp_path):
    texts = training_sentences(demo_texts())
    cfg = QueryTowerConfig(enabled=True, layers=[0, 5], **FAST)
    info = distill(teacher, texts, cfg, tmp_path)
    assert info["layers"] == [0, 5] and info["teacher_layers"] == 6 and info["steps"] == 40
    assert info["holdout_texts"] == 12 and info["train_texts"] == len(texts) - 12
    before, after = info["holdout_cosine_before"]["mean"], info["holdout_cosine"]["mean"]
    assert after > before + 0.05, (before, after)  # training moved it towards the teacher

    tower = Encoder(tower_model_config(teacher.cfg, tmp_path))
    assert tower.model.config.num_hidden_layers == 2
    assert tower.max_seq_length == teacher.max_seq_length and tower.pooling == teacher.pooling
    held = ["The moon is a natural satellite of the earth.", "Bees make honey from the nectar of flowers."]
    cos = (tower.encode_queries(held) * teacher.encode_queries(held)).sum(axis=1)
    assert cos.min() > 0.5, cos
    assert read_tower_info(tmp_path)["holdout_cosine"] == info["holdout_cosine"]


def test_bad_layers_and_too_few_texts_are_clear_errors(teacher, tmp_path):
    with pytest.raises(ValueError, match="distinct, increasing indices"):
        distill(teacher, training_sentences(demo_texts()), QueryTowerConfig(layers=[3, 1], **FAST), tmp_path / "a")
    with pytest.raises(ValueError, match="distinct, increasing indices"):
        distill(teacher, training_sentences(demo_texts()), QueryTowerConfig(layers=[0, 6], **FAST), tmp_path / "b")
    with pytest.raises(ValueError, match="too small to distil"):
        distill(teacher, ["only a few words here"] * 5, QueryTowerConfig(**FAST), tmp_path / "c")


def test_time_guard_fails_the_distillation_or_truncates_it(teacher, tmp_path):
    texts = training_sentences(demo_texts())
    cfg = QueryTowerConfig(enabled=True, layers=[0, 5], **{**FAST, "steps": 5, "max_train_seconds": 1e-9})
    with pytest.raises(TrainingBudgetExceeded, match="query tower: time guard max_train_seconds"):
        distill(teacher, texts, cfg, tmp_path / "fail")
    info = distill(teacher, texts, cfg.model_copy(update={"on_budget": "stop"}), tmp_path / "stop")
    assert info["truncated"] is True and info["steps"] == 1 and info["planned_steps"] == 5
    assert read_tower_info(tmp_path / "stop")["truncated"] is True
    # the guard is not part of the recipe (same key), and a truncated tower is never reused
    assert tower_key(teacher, cfg, texts) == tower_key(teacher, cfg.model_copy(update={"max_train_seconds": 0}), texts)
    stop = cfg.model_copy(update={"on_budget": "stop"})
    first = build_query_tower(teacher.cfg, stop, demo_texts(), tmp_path / "built")
    again = build_query_tower(teacher.cfg, stop, demo_texts(), tmp_path / "built")
    assert first["truncated"] and again["reused"] is False


def test_build_reuses_an_unchanged_tower_and_redoes_a_changed_one(tmp_path):
    model = ModelConfig(precision="fp32")
    cfg = QueryTowerConfig(enabled=True, layers=[0, 5], **{**FAST, "steps": 5})
    first = build_query_tower(model, cfg, demo_texts(), tmp_path / "tower")
    assert first["reused"] is False and (tmp_path / "tower" / TOWER_FILE).exists()
    again = build_query_tower(model, cfg, demo_texts(), tmp_path / "tower")
    assert again["reused"] is True and again["key"] == first["key"]
    changed = build_query_tower(model, cfg.model_copy(update={"steps": 6}), demo_texts(), tmp_path / "tower")
    assert changed["reused"] is False and changed["steps"] == 6 and changed["key"] != first["key"]
    assert not list(tmp_path.glob(".tower.tmp-*"))  # the atomic writer left nothing behind


def _demo_spec(tmp_path: Path, tower: bool):
    spec = load_spec(ROOT / "pipelines" / "demo.yaml")
    query_tower = QueryTowerConfig(enabled=tower, layers=[0, 5], **FAST)
    return spec.model_copy(update={"index": spec.index.model_copy(update={"query_tower": query_tower}),
                                   "tracking": spec.tracking.model_copy(update={"uri": f"sqlite:///{tmp_path}/ml.db"})})


def test_pipeline_distils_evaluates_publishes_and_serves_the_tower(tmp_path):
    results = {r.stage: r for r in Pipeline(_demo_spec(tmp_path, True), tmp_path / "ws", progress=False).run()}
    tower = results["index"].summary["query_tower"]
    assert tower["layers"] == [0, 5] and tower["reused"] is False

    evaluated = results["evaluate"].summary
    assert set(evaluated["query_tower"]["modes"]) == {"dense", "hybrid"}
    assert "dense-tower: nDCG@10" in stage_details("evaluate", evaluated)       # the CLI's results table
    assert "query tower 2/6 layers" in stage_details("index", results["index"].summary)
    assert 0 < evaluated["query_tower"]["modes"]["dense"]["metrics"]["ndcg@10"] <= 1

    ws = tmp_path / "ws" / "demo"
    version = results["publish"].summary["version"]
    snap = Path(results["publish"].summary["root"]) / "demo" / version
    manifest = json.loads((snap / "manifest.json").read_text())
    assert {"dense-tower", "hybrid-tower"} <= set(manifest["metrics"])
    assert manifest["metrics"]["dense-tower"] == evaluated["query_tower"]["modes"]["dense"]["metrics"]
    files = {f["path"] for f in manifest["files"]}
    assert "query_tower/model.safetensors" in files and "query_tower/tower.json" in files
    assert manifest["extra"]["query_tower"]["layers"] == [0, 5]

    served = open_snapshot(snap, query_runtime="torch")
    info = served.query_encoder["query_tower"]
    assert info["layers"] == [0, 5] and info["ndcg@10"]["dense"] == manifest["metrics"]["dense-tower"]["ndcg@10"]
    full = open_snapshot(snap, query_runtime="torch", query_tower=False)
    assert full.query_encoder["query_tower"] is None
    q = ["how do bees make honey"]
    tower_vec, full_vec = served.encode(q), full.encode(q)
    assert not np.allclose(tower_vec, full_vec)                    # a different encoder answered
    assert float((tower_vec * full_vec).sum()) > 0.5               # ... into the same space

    # Unchanged: the index stage is skipped. Disabled: the tower leaves the index and the next snapshot.
    again = {r.stage: r for r in Pipeline(_demo_spec(tmp_path, True), tmp_path / "ws", progress=False).run()}
    assert again["index"].skipped
    off = {r.stage: r for r in Pipeline(_demo_spec(tmp_path, False), tmp_path / "ws", progress=False).run()}
    assert not (ws / "index" / "query_tower").exists() and "query_tower" not in off["evaluate"].summary
    snap2 = Path(off["publish"].summary["root"]) / "demo" / off["publish"].summary["version"]
    assert not (snap2 / "query_tower").exists()
    assert open_snapshot(snap2, query_runtime="torch").query_encoder["query_tower"] is None

