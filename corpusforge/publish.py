"""The publish stage: turn a build directory into an immutable, aliased index snapshot.

This module is the stage-level entry point; the machinery lives in :mod:`corpusforge.snapshots`
(re-exported here, so ``from corpusforge.publish import SnapshotStore`` works).
"""

from __future__ import annotations

import os
from typing import Any

from corpusforge.snapshots import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    AliasError,
    IncompleteInfo,
    ManifestError,
    SnapshotError,
    SnapshotExistsError,
    SnapshotInfo,
    SnapshotNotFoundError,
    SnapshotStore,
    VerificationError,
    VerifyReport,
    build_manifest,
    default_cache_dir,
    library_versions,
    version_id,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "AliasError",
    "IncompleteInfo",
    "ManifestError",
    "SnapshotError",
    "SnapshotExistsError",
    "SnapshotInfo",
    "SnapshotNotFoundError",
    "SnapshotStore",
    "VerificationError",
    "VerifyReport",
    "build_manifest",
    "default_cache_dir",
    "library_versions",
    "publish_build",
    "version_id",
]


def publish_build(
    build_dir: str | os.PathLike[str],
    *,
    root: str,
    index_name: str,
    spec: dict[str, Any],
    model: dict[str, Any],
    corpus_hash: str,
    index: dict[str, Any],
    metrics: dict[str, Any],
    alias: str | None = None,
    endpoint_url: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Build the manifest, publish the build and (optionally) point an alias at it.

    The one-call form of the publish stage, for the CLI and the orchestrator shells. Gating (only
    promote when the metrics beat the current alias) is the caller's decision: pass
    ``alias=None`` to publish without moving any alias.

    Args:
        build_dir: the local build directory.
        root: the snapshot root (local directory or ``s3://bucket/prefix``).
        index_name: the index name.
        spec: the pipeline spec as plain data.
        model: model information (name, fingerprint...).
        corpus_hash: the cleaned corpus hash.
        index: the index layout (factory strings, dims, shard counts...).
        metrics: evaluation metrics.
        alias: the alias to point at the new version (verified first), or None.
        endpoint_url: the S3 endpoint for S3-compatible servers.
        extra: anything else to record in the manifest.

    Returns:
        The new version id.
    """
    manifest = build_manifest(
        build_dir, index_name=index_name, spec=spec, model=model, corpus_hash=corpus_hash,
        index=index, metrics=metrics, extra=extra,
    )
    store = SnapshotStore(root, endpoint_url)
    version = store.publish(build_dir, manifest)
    if alias:
        store.set_alias(index_name, alias, version)
    return version
