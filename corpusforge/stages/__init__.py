"""The stage functions of the graph (`corpusforge.graph`): each takes a `StageContext`.

A stage function reads its inputs from the workspace, writes its outputs atomically, enforces
the data contracts of what it wrote and returns its summary. It knows nothing of the runner
(CLI, Dagster, Airflow) that called it, nor of the other stages beyond their outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corpusforge.spec import ModelConfig, PipelineSpec
from corpusforge.workspace import Workspace


@dataclass
class StageContext:
    """What a stage gets: the spec, its workspace, and where to log.

    Attributes:
        spec: the validated pipeline spec.
        ws: the pipeline's workspace paths.
        progress: show progress bars (off under orchestrators).
        fingerprint: the stage's fingerprint (names its checkpoints and is recorded in its outputs).
        tracker: the MLflow run of this stage (a `tracking.RunTracker`), or None; trained models
            are logged and registered in it.
    """

    spec: PipelineSpec
    ws: Workspace
    progress: bool = True
    fingerprint: str = ""
    tracker: Any = None


@dataclass(frozen=True)
class Retriever:
    """The parts a pipeline evaluates and publishes: the base build, or the trained one.

    Attributes:
        model: the encoder configuration (the spec's model, or the trained bi-encoder).
        embeddings: the embeddings dataset of `dense_dir`.
        dense_dir: the dense index directory.
        bm25_dir: the BM25 index directory.
        tower_dir: the distilled query tower, when the build has one.
        reranker_dir: the reranker as a snapshot ships it, when trained.
        trained: True for the trained retriever.
    """

    model: ModelConfig
    embeddings: Path
    dense_dir: Path
    bm25_dir: Path
    tower_dir: Path | None
    reranker_dir: Path | None
    trained: bool


def retriever(spec: PipelineSpec, ws: Workspace) -> Retriever:
    """The retriever a spec's evaluate and publish stages use.

    Args:
        spec: the pipeline spec.
        ws: its workspace.

    Returns:
        The trained retriever when ``train.enabled``, else the base build.
    """
    tower = ws.index_dir / "query_tower"
    if not spec.train.enabled:
        return Retriever(spec.model, ws.dataset("embeddings"), ws.index_dir / "dense", ws.index_dir / "bm25",
                         tower if (tower / "tower.json").exists() else None, None, False)
    model = spec.model.model_copy(update={"name": str(ws.trained_model_dir)})
    rr = ws.reranker_build_dir if spec.train.reranker.enabled else None
    return Retriever(model, ws.dataset("embeddings_trained"), ws.trained_index_dir / "dense", ws.index_dir / "bm25",
                     None, rr, True)
