"""The closed loop end to end on the tiny corpus (slow): train, re-embed, publish, promote only on dev gains."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from corpusforge.cli import app
from corpusforge.snapshot_build import index_name, snapshot_store
from corpusforge.pipeline import Pipeline
from corpusforge.spec import load_spec
from corpusforge.train.loop import CANDIDATE_ALIAS, train_pipeline
from train_corpus import write_corpus, write_spec


@pytest.mark.slow
def test_train_cli_then_a_run_that_does_not_improve_keeps_production(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    spec_path = write_spec(tmp_path / "spec.yaml", corpus, tmp_path / "ws")
    result = CliRunner().invoke(app, ["train", str(spec_path)])
    assert result.exit_code == 0, result.output
    assert "production moved" in result.output

    spec = load_spec(spec_path)
    pipe = Pipeline(spec, progress=False)
    store, name = snapshot_store(pipe), index_name(pipe)
    first = store.resolve(name, "production")
    manifest = store.manifest(name, first)
    models = manifest["training"]["models"]
    assert models["biencoder"]["name"] == "tiny-biencoder" and models["reranker"]["name"] == "tiny-colbert"
    assert manifest["model"]["name"].endswith(f"biencoder-{manifest['training']['run']}")
    assert any(path.startswith("reranker/") for path in json.dumps(manifest["files"]).split('"'))

    # the tiny task is solved (dev 1.0): a second run cannot beat it, so production stays
    report = train_pipeline(spec)
    assert report["publish"]["promoted"] is False
    assert store.resolve(name, "production") == first
    assert store.resolve(name, CANDIDATE_ALIAS) == report["publish"]["version"] != first
    assert report["biencoder"]["registry"]["promoted"] is False  # champion stays with the first version too
