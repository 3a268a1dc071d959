"""Snapshot manifests: what a build holds, where it came from, and the version id derived from it.

A manifest is plain JSON. It names the index, the spec, the model, the corpus hash, the index
layout, the evaluation metrics, the library versions, and every file of the build with its size
and sha256. The version id is derived from the manifest (see :func:`version_id`), so a manifest
and its version check each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import stat
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

MANIFEST_NAME = "manifest.json"
FORMAT = "corpusforge.snapshot"
FORMAT_VERSION = 1
HASH_CHUNK = 1 << 20  # 1 MiB reads: large enough for throughput, small enough to stream

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# `20261121T203015.123456Z-1a2b3c4d`: fixed width, so lexicographic order is creation order.
VERSION_RE = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}$")

# Distributions whose versions go into every manifest (read from package metadata only, so
# building a manifest never imports torch or faiss). The first installed name of a tuple wins.
LIBRARIES: dict[str, tuple[str, ...]] = {
    "corpusforge": ("corpusforge",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss"),
    "bm25s": ("bm25s",),
    "pyarrow": ("pyarrow",),
    "numpy": ("numpy",),
    "torch": ("torch",),
    "transformers": ("transformers",),
    "sentence-transformers": ("sentence-transformers",),
}


class ManifestError(ValueError):
    """A manifest or a build directory is malformed (the message names what and why)."""


def check_name(kind: str, name: str) -> str:
    """Validate an index or alias name (a single safe path component).

    Args:
        kind: what the name is, for the error message ("index name", "alias").
        name: the name to check.

    Returns:
        The name, unchanged.

    Raises:
        ManifestError: when the name is empty, too long, or not ``[A-Za-z0-9][A-Za-z0-9_.-]*``.
    """
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ManifestError(
            f"invalid {kind} {name!r}: use 1-128 characters from [A-Za-z0-9_.-], starting with a letter or digit"
        )
    return name


def sha256_stream(chunks: Iterable[bytes]) -> tuple[str, int]:
    """Hash a stream of byte chunks.

    Args:
        chunks: the content, in order.

    Returns:
        ``(hex sha256, total size in bytes)``.
    """
    h = hashlib.sha256()
    n = 0
    for chunk in chunks:
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def iter_file(path: str | os.PathLike[str], chunk_size: int = HASH_CHUNK) -> Iterator[bytes]:
    """Stream a local file in chunks (never the whole file in memory).

    Args:
        path: the file.
        chunk_size: bytes per chunk.

    Returns:
        An iterator of byte chunks.
    """
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            yield chunk


def sha256_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """Streamed sha256 of a local file.

    Args:
        path: the file.

    Returns:
        ``(hex sha256, size in bytes)``.
    """
    return sha256_stream(iter_file(path))


class HashingReader:
    """A read-only, forward-only file wrapper that hashes what passes through it.

    Copies and uploads read through it, so the bytes that were written are the bytes that were
    hashed: one read of the source, and a source that changed since its manifest was built is
    caught (see :meth:`check`). It deliberately cannot seek, so boto3 reads it strictly in order.

    Args:
        f: a binary file opened for reading.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._h = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (all when negative) and hash them."""
        data = self._f.read(n)
        self._h.update(data)
        self.size += len(data)
        return data

    def readable(self) -> bool:
        """Always True."""
        return True

    def seekable(self) -> bool:
        """Always False: re-reading would hash bytes twice."""
        return False

    @property
    def sha256(self) -> str:
        """Hex sha256 of everything read so far."""
        return self._h.hexdigest()

    def check(self, rel: str, size: int, sha256: str) -> None:
        """Raise when what was read differs from the manifest entry.

        Args:
            rel: the file's path in the build, for the message.
            size: the size the manifest records.
            sha256: the sha256 the manifest records.

        Raises:
            ManifestError: on a size or hash mismatch.
        """
        if self.size != size or self.sha256 != sha256:
            raise ManifestError(
                f"build file {rel!r} changed after its manifest was built: "
                f"manifest says {size} bytes sha256 {sha256[:12]}..., read {self.size} bytes sha256 {self.sha256[:12]}..."
            )


def scan_build(build_dir: str | os.PathLike[str]) -> list[str]:
    """List every regular file of a build as sorted relative posix paths.

    Args:
        build_dir: the build directory.

    Returns:
        Sorted relative paths such as ``dense/shard-00000.faiss``.

    Raises:
        ManifestError: when the directory is missing or empty, holds a reserved top-level
            ``manifest.json``, a symlink to a directory, or a special file (fifo, socket, device):
            any of these would otherwise be lost or hang silently.
    """
    root = Path(build_dir)
    if not root.is_dir():
        raise ManifestError(f"build directory {str(root)!r} does not exist or is not a directory")
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            if (Path(dirpath) / d).is_symlink():
                raise ManifestError(f"build directory holds a symlink to a directory: {str(Path(dirpath) / d)!r}")
        for name in filenames:
            p = Path(dirpath) / name
            mode = os.stat(p).st_mode  # follows file symlinks: their content is published
            if not stat.S_ISREG(mode):
                raise ManifestError(f"build directory holds a non-regular file: {str(p)!r}")
            out.append(p.relative_to(root).as_posix())
    if not out:
        raise ManifestError(f"build directory {str(root)!r} holds no files: nothing to publish")
    if MANIFEST_NAME in out:
        raise ManifestError(f"build directory {str(root)!r} must not hold a top-level {MANIFEST_NAME} (reserved)")
    return sorted(out)


def library_versions() -> dict[str, str]:
    """Versions of Python and of the installed libraries that shape an index.

    Returns:
        ``{"python": "3.11.9", "faiss": "1.9.0", ...}``; libraries not installed are left out.
    """
    out = {"python": platform.python_version()}
    for label, dists in LIBRARIES.items():
        for dist in dists:
            try:
                out[label] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    if "corpusforge" not in out:  # running from a source checkout that was never pip-installed
        from corpusforge import __version__

        out["corpusforge"] = __version__
    return out


def _utc_now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def normalize(manifest: dict[str, Any]) -> dict[str, Any]:
    """A JSON round trip: the manifest exactly as it will read back from ``manifest.json``.

    Non-JSON values (paths, datetimes) become strings, so the content hash computed before
    writing equals the one computed after reading.

    Args:
        manifest: a manifest dict.

    Returns:
        A new dict of plain JSON values.
    """
    return json.loads(json.dumps(manifest, default=str, allow_nan=True))


def build_manifest(
    build_dir: str | os.PathLike[str],
    *,
    index_name: str,
    spec: dict[str, Any],
    model: dict[str, Any],
    corpus_hash: str,
    index: dict[str, Any],
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Describe a build: provenance, metrics, library versions and every file with its sha256.

    Files are hashed streamed, 1 MiB at a time. The manifest carries no version yet:
    :meth:`SnapshotStore.publish` derives it with :func:`version_id`, so metrics may still be
    added to the returned dict before publishing.

    Args:
        build_dir: the local directory a build produced (``chunks/``, ``dense/``, ``bm25/``...).
        index_name: the index this build belongs to (one safe path component).
        spec: the pipeline spec as plain data (``PipelineSpec.report()``).
        model: model information (name, fingerprint, dim...).
        corpus_hash: the hash of the cleaned corpus the build was made from.
        index: the index layout (FAISS factory strings, dims, shard counts, BM25 settings...).
        metrics: evaluation metrics (e.g. ``{"ndcg@10": 0.66}``; nesting allowed).
        extra: anything else to record (e.g. the MLflow run id).

    Returns:
        The manifest as a dict of plain JSON values.

    Raises:
        ManifestError: on a bad index name or a bad build directory (see :func:`scan_build`).
    """
    check_name("index name", index_name)
    root = Path(build_dir)
    files = []
    for rel in scan_build(root):
        sha, size = sha256_file(root / rel)
        files.append({"path": rel, "size": size, "sha256": sha})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "index_name": index_name,
        "created_at": _utc_now_iso(),
        "spec": spec,
        "model": model,
        "corpus_hash": corpus_hash,
        "index": index,
        "metrics": metrics,
        "libraries": library_versions(),
        "totals": {"files": len(files), "bytes": sum(f["size"] for f in files)},
        "files": files,
        "extra": extra or {},
    }
    return normalize(manifest)


def content_hash(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, without its ``version`` field.

    Args:
        manifest: a manifest dict.

    Returns:
        A 64-character hex digest.
    """
    body = {k: v for k, v in normalize(manifest).items() if k != "version"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def version_id(manifest: dict[str, Any]) -> str:
    """The version id of a manifest: ``<created_at as YYYYMMDDTHHMMSS.ffffffZ>-<8 hex>``.

    Why this shape: the UTC timestamp (microseconds, fixed width) makes ids sort in creation
    order as plain strings, on a local disk and in an S3 listing alike; the first 8 hex digits of
    the manifest's content hash make ids unique without any coordination between publishers
    (two different builds in the same microsecond still differ), and tie the id to the content,
    so a manifest edited after publishing no longer matches its version. Ordering trusts the
    builders' clocks.

    Args:
        manifest: a manifest from :func:`build_manifest`.

    Returns:
        The version id.

    Raises:
        ManifestError: when ``created_at`` is missing or not a UTC ISO timestamp.
    """
    created = manifest.get("created_at")
    try:
        ts = datetime.strptime(str(created), "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        raise ManifestError(f"manifest created_at {created!r} is not a UTC timestamp like 2026-11-21T20:30:15.123456Z") from None
    return ts.strftime("%Y%m%dT%H%M%S.%fZ") + "-" + content_hash(manifest)[:8]


def safe_relpath(rel: Any) -> bool:
    """True when ``rel`` is a relative posix path that stays inside its snapshot."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return False
    p = PurePosixPath(rel)
    return not p.is_absolute() and all(part not in ("", ".", "..") for part in p.parts) and p.as_posix() == rel


def manifest_problems(manifest: Any, *, index: str | None = None, version: str | None = None) -> list[str]:
    """Structural checks of a manifest, without touching any file.

    Args:
        manifest: the parsed manifest.
        index: the index it was found under, when known (must match ``index_name``).
        version: the version it was found under, when known (must match ``version`` and the
            content hash).

    Returns:
        Problems as readable sentences; empty when the manifest is consistent.
    """
    if not isinstance(manifest, dict):
        return ["manifest is not a JSON object"]
    problems = []
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        problems.append(
            f"unknown manifest format {manifest.get('format')!r} v{manifest.get('format_version')!r} "
            f"(expected {FORMAT!r} v{FORMAT_VERSION})"
        )
    if index is not None and manifest.get("index_name") != index:
        problems.append(f"manifest index_name {manifest.get('index_name')!r} does not match its location {index!r}")
    if version is not None:
        if manifest.get("version") != version:
            problems.append(f"manifest version {manifest.get('version')!r} does not match its location {version!r}")
        else:
            try:
                if version_id(manifest) != version:
                    problems.append("manifest content does not match its version id (edited after publishing?)")
            except ManifestError as e:
                problems.append(str(e))
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        problems.append("manifest lists no files")
        return problems
    seen = set()
    for entry in files:
        ok = (
            isinstance(entry, dict)
            and safe_relpath(entry.get("path"))
            and isinstance(entry.get("size"), int)
            and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str)
            and len(entry["sha256"]) == 64
        )
        if not ok:
            problems.append(f"malformed manifest file entry {entry!r}")
        elif entry["path"] in seen or entry["path"] == MANIFEST_NAME:
            problems.append(f"manifest lists {entry['path']!r} twice or as the reserved name")
        else:
            seen.add(entry["path"])
    return problems


def flatten_metrics(metrics: Any, prefix: str = "") -> dict[str, float]:
    """Flatten nested metrics to ``{"dense.ndcg@10": 0.645, ...}``, numbers only.

    Args:
        metrics: a (possibly nested) dict of metrics.
        prefix: the key prefix (used by the recursion).

    Returns:
        A flat dict of the numeric leaves, in insertion order.
    """
    out: dict[str, float] = {}
    if isinstance(metrics, dict):
        for k, v in metrics.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                out.update(flatten_metrics(v, key))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[key] = float(v)
    return out
