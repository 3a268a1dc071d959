"""The stage graph: declared once, consistent, and the only place a stage list lives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from corpusforge.graph import GRAPH, STAGES, deps_for, stage, stages_for
from corpusforge.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
DATA_STAGES = ["extract", "clean", "chunk", "embed", "index", "evaluate", "publish"]
TRAIN_STAGES = ["extract", "clean", "chunk", "embed", "index", "mine", "train_retriever", "embed_trained",
                "index_trained", "train_reranker", "evaluate", "publish"]


def test_a_plain_spec_runs_the_data_stages_and_a_training_spec_the_whole_graph():
    plain, train = load_spec(ROOT / "pipelines" / "demo.yaml"), load_spec(ROOT / "pipelines" / "demo-train.yaml")
    assert [s.name for s in stages_for(plain)] == DATA_STAGES
    assert [s.name for s in stages_for(train)] == TRAIN_STAGES
    assert [s.name for s in stages_for(train, until="train_retriever")] == TRAIN_STAGES[:7]
    assert deps_for(plain, "evaluate") == ["index"]
    assert deps_for(train, "evaluate") == ["index", "index_trained", "train_reranker"]
    without_reranker = train.model_copy(update={"train": train.train.model_copy(
        update={"reranker": train.train.reranker.model_copy(update={"enabled": False})})})
    assert "train_reranker" not in [s.name for s in stages_for(without_reranker)]
    with pytest.raises(ValueError, match="not part of pipeline 'demo'"):
        stages_for(plain, until="mine")
    with pytest.raises(ValueError, match="unknown stage 'embedd'"):
        stage("embedd")


def test_the_graph_is_topological_and_its_parts_resolve():
    seen: set[str] = set()
    assets: list[str] = []
    for s in GRAPH:
        assert set(s.deps) <= seen, f"{s.name} depends on a later stage"
        assert set(s.contracts) <= set(s.assets), f"{s.name} guards a dataset it does not materialise"
        assert callable(s.function()) and s.description
        seen.add(s.name)
        assets += s.assets
    assert len(assets) == len(set(assets)), "an asset has two producers"
    assert STAGES == tuple(s.name for s in GRAPH)


def test_every_dataset_a_stage_writes_has_a_contract():
    from corpusforge.data.contracts import SUITES
    from corpusforge.stages.checks import suite_of

    guarded = {d for s in GRAPH for d in s.contracts}
    assert {"documents", "documents_clean", "quarantine", "chunks", "embeddings", "hard_negatives",
            "training_pairs", "embeddings_trained"} <= guarded
    assert all(suite_of(d) in SUITES for d in guarded)


@pytest.mark.parametrize("folder", ["corpusforge_dagster", "dags", "corpusforge/cli.py"])
def test_no_runner_restates_the_stage_list(folder):
    """Runners are generated from the graph: no file outside it spells two stage names in a row."""
    names = "|".join(STAGES)
    pattern = re.compile(rf"""["']({names})["']\s*[,)\]]\s*["']({names})["']""")
    paths = [ROOT / folder] if folder.endswith(".py") else sorted((ROOT / folder).rglob("*.py"))
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in paths for m in pattern.finditer(p.read_text())]
    assert offenders == []
