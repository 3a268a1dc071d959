"""What a pipeline's snapshot is made of: its store, its index name, its manifest.

The snapshot holds what serving needs and nothing else: the chunk store (`chunks/`), the dense
shards (`dense/`), the BM25 files (`bm25/`), the distilled query tower when the spec builds one
(`query_tower/`), a trained retriever's query encoder (`model/`) and reranker (`reranker/`), and
the evaluation metrics (`eval/metrics.json`); `manifest.json` records the spec, the model
fingerprint, the corpus hash, the index parameters, every file's size and sha256, the test and
dev metrics, the training facts and the library versions. The publish stage
(`stages.publishing`) lays it out and moves the aliases.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corpusforge.data import datasets
from corpusforge.spec import PipelineSpec
from corpusforge.workspace import Workspace

if TYPE_CHECKING:
    from corpusforge.stages import Retriever

SHIPPED_MODEL = "model"  # the folder of a snapshot that ships its query encoder (a trained bi-encoder)


def corpus_hash(documents_path: Path) -> str:
    """A hash of a documents dataset's identity and content: (doc_id, content_hash) in order.

    Args:
        documents_path: a documents dataset (schemas.DOCUMENTS).

    Returns:
        A 64-character hex sha256; equal for equal corpora, whatever produced them.
    """
    h = hashlib.sha256()
    for batch in datasets.iter_batches(documents_path, columns=["doc_id", "content_hash"]):
        for doc_id, content in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
            h.update(f"{doc_id}\x1f{content}\n".encode())
    return h.hexdigest()


def store_for(spec: PipelineSpec, ws: Workspace):
    """The `SnapshotStore` a pipeline publishes to (local by default, S3 by configuration)."""
    from corpusforge.snapshots import SnapshotStore

    return SnapshotStore(ws.publish_root(spec), endpoint_url=spec.publish.s3_endpoint_url)


def index_name(spec: PipelineSpec) -> str:
    """The index a pipeline publishes under: ``publish.index_name``, else the spec's name."""
    return spec.publish.index_name or spec.name


def build_manifest_for(spec: PipelineSpec, ws: Workspace, retriever: "Retriever", build_dir: Path,
                       metrics: dict[str, Any], training: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest of a pipeline's snapshot build.

    Args:
        spec: the pipeline spec.
        ws: its workspace.
        retriever: the parts the build ships (`stages.retriever`).
        build_dir: the assembled staging directory (every file is hashed).
        metrics: the evaluate stage's summary (``eval/metrics.json``).
        training: the training facts (models, steps, truncation), or None without training.

    Returns:
        The manifest.
    """
    from corpusforge.encoding.models import model_fingerprint, resolve_model_path
    from corpusforge.snapshots import build_manifest

    dense = json.loads((retriever.dense_dir / "dense.json").read_text())
    bm25 = json.loads((retriever.bm25_dir / "bm25.json").read_text())
    tower = metrics.get("query_tower") or {}
    embed_state = ws.read_state("embed_trained" if retriever.trained else "embed") or {}
    model_cfg = retriever.model.model_dump(mode="json")
    if retriever.trained:
        model_cfg["name"] = SHIPPED_MODEL  # the snapshot's own folder: a snapshot never points into a workspace
    model = {
        "name": retriever.model.name,
        "path": str(resolve_model_path(retriever.model.name)),
        "fingerprint": model_fingerprint(retriever.model.name),
        "encoder_fingerprint": embed_state.get("summary", {}).get("model_fingerprint"),
        "dim": embed_state.get("summary", {}).get("dim"),
        # the device and precision the vectors were made with (`auto` resolves per machine)
        "device": embed_state.get("summary", {}).get("device"),
        "precision": embed_state.get("summary", {}).get("precision"),
        "config": model_cfg,
        "shipped": retriever.trained,
    }
    stage_fps = {s: (ws.read_state(s) or {}).get("fingerprint") for s in ws.recorded_stages()}
    extra: dict[str, Any] = {"stage_fingerprints": stage_fps, "dev": metrics.get("dev")}
    if tower:
        extra["query_tower"] = {k: v for k, v in tower.items() if k != "modes"}
    if training is not None:
        extra["training"] = training
    return build_manifest(
        build_dir,
        index_name=index_name(spec),
        spec=spec.report(),
        model=model,
        corpus_hash=corpus_hash(ws.dataset("documents_clean")),
        index={"dense": dense, "bm25": bm25},
        metrics={**{mode: v["metrics"] for mode, v in metrics.get("modes", {}).items()},
                 **{f"{mode}-tower": v["metrics"] for mode, v in tower.get("modes", {}).items()}},
        extra=extra,
    )


def file_entries(files) -> list[dict]:
    """A manifest's file entries as a list (the manifest may key them by path)."""
    return list(files.values()) if isinstance(files, dict) else list(files)


def published_version_exists(spec: PipelineSpec, ws: Workspace, version: str) -> bool:
    """True when `version` is still a complete snapshot in the pipeline's store."""
    return any(v.version == version and v.complete for v in store_for(spec, ws).versions(index_name(spec)))


def verify_published(spec: PipelineSpec, ws: Workspace) -> tuple[str, list[str]]:
    """Verify the snapshot the pipeline's last publish recorded (every file's size and sha256).

    Args:
        spec: the pipeline spec.
        ws: its workspace (the publish stage has run).

    Returns:
        (version, problems); no problems means the snapshot is intact.
    """
    version = (ws.read_state("publish") or {}).get("summary", {}).get("version")
    if not version:
        return "", ["the publish stage has not recorded a version"]
    return version, list(store_for(spec, ws).verify(index_name(spec), version).problems)
