"""Assembles a pipeline's build into a snapshot, publishes it and moves the alias.

The snapshot holds what serving needs and nothing else: the chunk store (`chunks/`), the dense
shards (`dense/`), the BM25 files (`bm25/`), the distilled query tower when the spec builds one
(`query_tower/`) and the evaluation metrics (`eval/metrics.json`);
`manifest.json` records the spec, the model fingerprint, the corpus hash, the index parameters,
every file's size and sha256, the metrics and the library versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corpusforge import datasets

if TYPE_CHECKING:
    from corpusforge.pipeline import Pipeline


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


def snapshot_store(pipeline: "Pipeline"):
    """The `SnapshotStore` a pipeline publishes to (local by default, S3 by configuration)."""
    from corpusforge.snapshots import SnapshotStore

    return SnapshotStore(pipeline.ws.publish_root(pipeline.spec), endpoint_url=pipeline.spec.publish.s3_endpoint_url)


def index_name(pipeline: "Pipeline") -> str:
    return pipeline.spec.publish.index_name or pipeline.spec.name


def assemble(pipeline: "Pipeline", dest: Path) -> Path:
    """Lay out the snapshot's files under `dest` with hard links (no data is copied).

    Args:
        pipeline: a pipeline whose index and evaluate stages have run.
        dest: a directory that must not exist yet.

    Returns:
        `dest`.
    """
    ws = pipeline.ws
    parts = {"chunks": ws.dataset("chunks"), "dense": ws.index_dir / "dense", "bm25": ws.index_dir / "bm25"}
    if (ws.index_dir / "query_tower" / "tower.json").exists():
        parts["query_tower"] = ws.index_dir / "query_tower"
    for name, src in parts.items():
        shutil.copytree(src, dest / name, copy_function=_link_or_copy)
    (dest / "eval").mkdir()
    _link_or_copy(ws.eval_dir / "metrics.json", dest / "eval" / "metrics.json")
    return dest


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build_pipeline_manifest(pipeline: "Pipeline", build_dir: Path) -> dict[str, Any]:
    """The manifest of a pipeline's snapshot build."""
    from corpusforge.models import model_fingerprint, resolve_model_path
    from corpusforge.snapshots import build_manifest

    ws, spec = pipeline.ws, pipeline.spec
    dense = json.loads((ws.index_dir / "dense" / "dense.json").read_text())
    bm25 = json.loads((ws.index_dir / "bm25" / "bm25.json").read_text())
    metrics = json.loads((ws.eval_dir / "metrics.json").read_text())
    tower = metrics.get("query_tower") or {}
    embed_state = ws.read_state("embed") or {}
    model = {
        "name": spec.model.name,
        "path": str(resolve_model_path(spec.model.name)),
        "fingerprint": model_fingerprint(spec.model.name),
        "encoder_fingerprint": embed_state.get("summary", {}).get("model_fingerprint"),
        "dim": embed_state.get("summary", {}).get("dim"),
        "config": spec.model.model_dump(mode="json"),
    }
    return build_manifest(
        build_dir,
        index_name=index_name(pipeline),
        spec=spec.report(),
        model=model,
        corpus_hash=corpus_hash(ws.dataset("documents_clean")),
        index={"dense": dense, "bm25": bm25},
        metrics={**{mode: v["metrics"] for mode, v in metrics.get("modes", {}).items()},
                 **{f"{mode}-tower": v["metrics"] for mode, v in tower.get("modes", {}).items()}},
        extra={"stage_fingerprints": {s: (ws.read_state(s) or {}).get("fingerprint")
                                      for s in ("extract", "clean", "chunk", "embed", "index", "evaluate")},
               **({"query_tower": {k: v for k, v in tower.items() if k != "modes"}} if tower else {})},
    )


def publish_pipeline(pipeline: "Pipeline") -> dict[str, Any]:
    """Publish the pipeline's build as a new immutable snapshot and point the alias at it.

    The snapshot is verified (every file's size and sha256) before the alias moves; any failure
    leaves the alias where it was.

    Args:
        pipeline: a pipeline whose evaluate stage has run.

    Returns:
        The stage summary: version, alias, root, file count and bytes.
    """
    ws = pipeline.ws
    staging = ws.base / f".staging-{uuid.uuid4().hex[:8]}"
    for stale in ws.base.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        assemble(pipeline, staging)
        manifest = build_pipeline_manifest(pipeline, staging)
        store = snapshot_store(pipeline)
        name = index_name(pipeline)
        version = store.publish(staging, manifest)
        report = store.verify(name, version)
        if not report.ok:
            raise RuntimeError(f"snapshot {name}/{version} failed verification: {report.problems}")
        alias = pipeline.spec.publish.alias
        store.set_alias(name, alias, version)
        (ws.base / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = manifest["files"]
    return {"index": name, "version": version, "alias": alias, "root": store.root,
            "files": len(files), "bytes": sum(f["size"] for f in _file_entries(files)),
            "corpus_hash": manifest["corpus_hash"]}


def _file_entries(files) -> list[dict]:
    return list(files.values()) if isinstance(files, dict) else list(files)


def published_version_exists(pipeline: "Pipeline", version: str) -> bool:
    """True when `version` is still a complete snapshot in the pipeline's store."""
    store = snapshot_store(pipeline)
    return any(v.version == version and v.complete for v in store.versions(index_name(pipeline)))
