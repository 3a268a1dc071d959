"""The stage graph: every stage of a pipeline, declared once.

Each `Stage` names its upstream stages, the assets it materialises, the data contracts its
outputs must pass, what its fingerprint covers, where its outputs live and the function that
runs it. The CLI (`Pipeline.run`), the Dagster assets, the Airflow tasks and any other runner
are generated from `GRAPH`; none of them restates a stage list, an order or a decision.

With ``train.enabled`` the graph goes on after the base indexes: mine hard negatives -> fit the
retriever -> embed with it -> index -> fit the reranker, and evaluate and publish then use the
trained retriever. A spec without training skips those stages (`Stage.enabled`).

This module imports nothing heavy: orchestrators import it while parsing their definitions.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corpusforge.spec import PipelineSpec
    from corpusforge.workspace import Workspace


def _always(spec: "PipelineSpec") -> bool:
    return True


def _training(spec: "PipelineSpec") -> bool:
    return spec.train.enabled


def _reranker(spec: "PipelineSpec") -> bool:
    return spec.train.enabled and spec.train.reranker.enabled


@dataclass(frozen=True)
class Stage:
    """One stage of the graph.

    Attributes:
        name: the stage name (CLI ``--until``, Airflow task id, MLflow run suffix).
        description: one line for ``--help``, the Dagster UI and the Airflow DAG docs.
        run: ``module:function``; the function takes a `stages.StageContext` and returns the
            stage's summary (a JSON-able dict).
        deps: upstream stages (only those enabled for a spec count).
        assets: the datasets or artifacts it materialises (Dagster asset names).
        contracts: datasets among its outputs that must pass their data contract; the stage
            enforces them itself, so every runner checks the same things.
        config: spec -> the part of the spec its fingerprint covers.
        outputs: (workspace, spec) -> files or dataset directories that must all exist, and carry
            the stage's fingerprint, for the stage to count as done.
        enabled: spec -> whether the spec runs this stage.
        code_version: bump when the stage's output for the same input changes.
        timeout_hours: a generous wall-clock guard for orchestrators (a failed, retried task).
    """

    name: str
    description: str
    run: str
    deps: tuple[str, ...]
    assets: tuple[str, ...]
    config: Callable[["PipelineSpec"], Any]
    outputs: Callable[["Workspace", "PipelineSpec"], list[Path]]
    contracts: tuple[str, ...] = ()
    enabled: Callable[["PipelineSpec"], bool] = field(default=_always)
    code_version: int = 1
    timeout_hours: float = 2.0

    @property
    def training(self) -> bool:
        """True for the stages of the training branch."""
        return self.enabled is not _always

    def function(self) -> Callable[..., dict[str, Any]]:
        """The stage's function (imported on first use)."""
        module, name = self.run.split(":")
        return getattr(importlib.import_module(module), name)


def _model_fp(name: str) -> str:
    from corpusforge.encoding.models import model_fingerprint

    return model_fingerprint(name)


def _dump(section) -> Any:
    return section.model_dump(mode="json")


def _index_outputs(ws: "Workspace", spec: "PipelineSpec") -> list[Path]:
    out = [ws.index_dir / "dense" / "dense.json", ws.index_dir / "bm25" / "bm25.json"]
    if spec.index.query_tower.enabled:
        out.append(ws.index_dir / "query_tower" / "tower.json")
    return out


def _source_config(spec: "PipelineSpec") -> Any:
    data = _dump(spec.source)
    data.pop("fetch", None)  # how a missing source is obtained, not what is read (its digests pin that)
    return data


def _train_config(spec: "PipelineSpec") -> Any:
    data = _dump(spec.train)
    data.pop("reranker", None)  # its own stage
    data.pop("max_train_seconds", None)  # a guard, not part of the recipe
    data.pop("on_budget", None)
    return [data, _model_fp(spec.model.name)]


def _reranker_config(spec: "PipelineSpec") -> Any:
    data = _dump(spec.train.reranker)
    data.pop("max_train_seconds", None)
    data.pop("on_budget", None)
    return [data, spec.train.seed, spec.train.threads, spec.train.checkpoint_every]


GRAPH: tuple[Stage, ...] = (
    Stage("extract", "Read the source into documents; quarantine what cannot be read.",
          "corpusforge.stages.data:extract", (), ("documents",),
          config=_source_config,
          outputs=lambda ws, s: [ws.dataset("documents"), ws.quarantine("extract")],
          contracts=("documents",), code_version=2),  # 2: an empty acl gets default_acl; blank tags quarantine
    Stage("clean", "Normalise, filter and deduplicate documents; quarantine the rejects.",
          "corpusforge.stages.data:clean", ("extract",), ("documents_clean", "quarantine"),
          config=lambda s: _dump(s.clean),
          outputs=lambda ws, s: [ws.dataset("documents_clean"), ws.quarantine("clean")],
          contracts=("documents_clean", "quarantine"), code_version=2),  # 2: blank ACL tags quarantine
    Stage("chunk", "Split documents into token-bounded chunks.",
          "corpusforge.stages.data:chunk", ("clean",), ("chunks",),
          config=lambda s: [_dump(s.chunk), _model_fp(s.model.name)],  # the tokenizer counts tokens
          outputs=lambda ws, s: [ws.dataset("chunks"), ws.quarantine("chunk")],
          contracts=("chunks",)),
    Stage("embed", "Embed every chunk with the spec's model (cached by model x text).",
          "corpusforge.stages.model:embed", ("chunk",), ("embeddings",),
          config=lambda s: [_dump(s.model), _model_fp(s.model.name)],
          outputs=lambda ws, s: [ws.dataset("embeddings")],
          contracts=("embeddings",), timeout_hours=8.0),
    Stage("index", "Build the dense FAISS shards and the BM25 index (and the query tower).",
          "corpusforge.stages.model:index", ("embed",), ("dense_index", "bm25_index"),
          config=lambda s: _dump(s.index), outputs=_index_outputs, timeout_hours=4.0),
    Stage("mine", "Mine hard negatives for the training queries from BM25 and the base dense index.",
          "corpusforge.stages.training:mine", ("index",), ("hard_negatives", "training_pairs"),
          config=lambda s: [s.train.hard_negatives, s.train.mining_depth, s.train.margin, s.train.dev_fraction,
                            s.train.seed, s.train.dev_pool_depth, _dump(s.search)],
          outputs=lambda ws, s: [ws.train_dir / "hard_negatives", ws.train_dir / "training_pairs",
                                 ws.train_dir / "dev_pool"],
          contracts=("hard_negatives", "training_pairs"), enabled=_training),
    Stage("train_retriever", "Fit the DPR-style bi-encoder (in-batch + hard negatives); select on dev.",
          "corpusforge.stages.training:train_retriever", ("mine",), ("retriever_model",),
          config=_train_config,
          outputs=lambda ws, s: [ws.trained_model_dir / "corpusforge.json"], enabled=_training,
          code_version=2, timeout_hours=12.0),  # 2: the schedule plans every epoch's own batch count
    Stage("embed_trained", "Embed every chunk with the trained bi-encoder.",
          "corpusforge.stages.model:embed_trained", ("train_retriever", "chunk"), ("embeddings_trained",),
          config=lambda s: [_dump(s.model)],
          outputs=lambda ws, s: [ws.dataset("embeddings_trained")],
          contracts=("embeddings_trained",), enabled=_training, timeout_hours=8.0),
    Stage("index_trained", "Build the dense FAISS shards of the trained bi-encoder.",
          "corpusforge.stages.model:index_trained", ("embed_trained",), ("dense_index_trained",),
          config=lambda s: _dump(s.index.dense),
          outputs=lambda ws, s: [ws.trained_index_dir / "dense" / "dense.json"], enabled=_training,
          timeout_hours=4.0),
    Stage("train_reranker", "Fit the ColBERT-style reranker, precompute its document vectors, tune fusion on dev.",
          "corpusforge.stages.training:train_reranker", ("index_trained", "mine"), ("reranker_model",),
          config=_reranker_config,
          outputs=lambda ws, s: [ws.reranker_build_dir / "reranker.json"], enabled=_reranker,
          code_version=3, timeout_hours=12.0),  # 2: document vectors in fp32; 3: per-epoch batch counts
    Stage("evaluate", "Score every retrieval mode on the dev split (selection) and the report split.",
          "corpusforge.evaluation.offline:evaluate", ("index", "index_trained", "train_reranker"), ("evaluation",),
          config=lambda s: [_dump(s.evaluate), _dump(s.search), s.train.enabled, s.train.dev_fraction,
                            s.train.seed],
          outputs=lambda ws, s: [ws.eval_dir / "metrics.json"]),
    Stage("publish", "Publish an immutable, verified snapshot; move the alias as publish.promote says.",
          "corpusforge.stages.publishing:publish", ("evaluate",), ("snapshot",),
          config=lambda s: _dump(s.publish), outputs=lambda ws, s: [], timeout_hours=1.0),
)

STAGES: tuple[str, ...] = tuple(s.name for s in GRAPH)
_BY_NAME = {s.name: s for s in GRAPH}


def stage(name: str) -> Stage:
    """The stage called `name`.

    Raises:
        ValueError: no such stage (the message lists them).
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}") from None


def stages_for(spec: "PipelineSpec", until: str | None = None) -> list[Stage]:
    """The stages a spec runs, in order, up to and including `until`.

    Args:
        spec: the pipeline spec.
        until: the last stage (default: all). A stage the spec does not run is an error.

    Returns:
        The enabled stages in topological order.
    """
    enabled = [s for s in GRAPH if s.enabled(spec)]
    if until is None:
        return enabled
    last = stage(until)
    if not last.enabled(spec):
        raise ValueError(f"stage {until!r} is not part of pipeline {spec.name!r} (train.enabled is false)")
    return enabled[: enabled.index(last) + 1]


def deps_for(spec: "PipelineSpec", name: str) -> list[str]:
    """The upstream stages of `name` that the spec runs."""
    return [d for d in stage(name).deps if stage(d).enabled(spec)]
