"""Versioned, immutable index snapshots with atomic aliases, on a local disk or S3.

- :mod:`~corpusforge.snapshots.manifest`: manifests, file hashing, version ids.
- :mod:`~corpusforge.snapshots.backends`: the storage backends (local directory, S3).
- :mod:`~corpusforge.snapshots.store`: :class:`SnapshotStore` (publish, versions, verify,
  aliases, rollback, fetch, gc).
- :mod:`~corpusforge.snapshots.nofollow`: reading snapshot files without following symbolic links.

Importing this package never imports boto3, torch or faiss.
"""

from corpusforge.snapshots.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    ManifestError,
    build_manifest,
    library_versions,
    version_id,
)
from corpusforge.snapshots.store import (
    AliasError,
    GcItem,
    GcReport,
    IncompleteInfo,
    SnapshotError,
    SnapshotExistsError,
    SnapshotInfo,
    SnapshotNotFoundError,
    SnapshotStore,
    VerificationError,
    VerifyReport,
    default_cache_dir,
)
from corpusforge.snapshots.backends import Backend, LocalBackend, S3Backend, open_backend

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "AliasError",
    "Backend",
    "GcItem",
    "GcReport",
    "IncompleteInfo",
    "LocalBackend",
    "ManifestError",
    "S3Backend",
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
    "open_backend",
    "version_id",
]
