"""Versioned, immutable index snapshots with movable aliases, on a local disk or on S3.

Layout under the store root (the same keys on both backends)::

    <index>/<version>/...              the build's files, read-only
    <index>/<version>/manifest.json    written last: its presence commits the version
    <index>/aliases/<alias>.json       {"version": ..., "updated_at": ..., "history": [...]}
    <index>/aliases/.lock              the lock alias updates take (local roots only)

A version is *complete* when its manifest exists, is consistent with its location and content
hash, and every file it lists is stored with the listed size and nothing else is. Anything under
a version-like name without a manifest (and, locally, a ``.tmp-<version>`` staging directory) is
an *incomplete* leftover of a publish that failed or is still running: never listed as a
version, never resolvable, and removed by :meth:`SnapshotStore.gc` (``corpusforge snapshots gc``)
once older than a grace period.

A failed publish deliberately leaves its leftover in place rather than cleaning up in an
exception handler: a killed process cannot clean up either, so both paths end in the same
harmless state and one mechanism (``gc``) handles both.

Alias records are only ever changed through ``Backend.update_bytes``, which serializes writers
(a file lock on a local root, conditional writes on S3), so concurrent promotes keep every
history entry. Nothing in a version may be a symbolic link (see
:mod:`corpusforge.snapshots.nofollow`).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from corpusforge.snapshots.consistency import consistency_problems
from corpusforge.snapshots.manifest import (
    MANIFEST_NAME,
    VERSION_RE,
    ManifestError,
    _utc_now_iso,
    check_name,
    flatten_metrics,
    manifest_problems,
    normalize,
    scan_build,
    sha256_stream,
    version_id,
)
from corpusforge.snapshots.nofollow import UnsafePathError
from corpusforge.snapshots.backends import Backend, FileEntry, LocalBackend, ObjectInfo, make_read_only, open_backend, remove_tree

log = logging.getLogger(__name__)

ALIASES_DIR = "aliases"
STAGING_PREFIX = ".tmp-"
ALIAS_HISTORY_LIMIT = 100  # enough rollback depth; keeps the alias record small
UNFINISHED = f"no {MANIFEST_NAME}: publish unfinished"
# `gc` defaults: an alias's last GC_HISTORY entries (its recent rollback depth) are never removed,
# and an unfinished publish written to within GC_GRACE_S may still be running.
GC_HISTORY = 5
GC_GRACE_S = 3600.0


class SnapshotError(Exception):
    """Base class of snapshot store errors."""


class SnapshotNotFoundError(SnapshotError, LookupError):
    """The index, version or alias does not exist."""


class SnapshotExistsError(SnapshotError, FileExistsError):
    """A publish would overwrite an existing (or in-progress) version."""


class AliasError(SnapshotError, LookupError):
    """An alias is missing, or has no previous version to roll back to."""


class _AliasMoved(Exception):
    """Internal: an alias changed between reading it and updating it (rollback tries again)."""


class VerificationError(SnapshotError):
    """A snapshot failed verification; ``report`` says why.

    Args:
        report: the failed :class:`VerifyReport`.
        action: what was refused, for the message.
    """

    def __init__(self, report: VerifyReport, action: str) -> None:
        self.report = report
        shown = "; ".join(report.problems[:5]) + (f"; ... ({len(report.problems)} problems)" if len(report.problems) > 5 else "")
        super().__init__(f"{action}: snapshot {report.index}/{report.version} failed verification: {shown}")


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@dataclass(frozen=True)
class SnapshotInfo:
    """One published version, as listed by :meth:`SnapshotStore.versions`.

    Attributes:
        index: the index name.
        version: the version id (sorts in creation order).
        created_at: UTC ISO time the build's manifest was made.
        complete: True when the manifest is consistent and every listed file is stored with its
            size and nothing else is (sizes only; :meth:`SnapshotStore.verify` hashes).
        aliases: the aliases pointing at this version.
        metrics: the manifest's numeric metrics, flattened (``{"dense.ndcg@10": 0.645}``).
        n_files: the number of files in the manifest.
        total_bytes: their total size.
        problems: why the version is not complete (empty when it is).
    """

    index: str
    version: str
    created_at: str
    complete: bool
    aliases: tuple[str, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    n_files: int = 0
    total_bytes: int = 0
    problems: tuple[str, ...] = ()

    def metrics_summary(self, limit: int = 4) -> str:
        """The first ``limit`` metrics as ``name=value`` (4 decimals), for one table cell.

        Args:
            limit: how many metrics to show.

        Returns:
            E.g. ``"ndcg@10=0.6620 recall@100=0.9250"``; "" when there are none.
        """
        items = list(self.metrics.items())
        text = " ".join(f"{k}={v:.4f}" for k, v in items[:limit])
        return text + (f" (+{len(items) - limit})" if len(items) > limit else "")

    def as_row(self) -> dict[str, str]:
        """The info as ordered string columns, ready for ``rich.table.Table.add_row(*row.values())``.

        Returns:
            Columns version, created_at, complete, aliases, files, size, metrics.
        """
        return {
            "version": self.version,
            "created_at": self.created_at,
            "complete": "yes" if self.complete else "NO: " + "; ".join(self.problems[:2]),
            "aliases": ", ".join(self.aliases),
            "files": str(self.n_files),
            "size": _human_bytes(self.total_bytes),
            "metrics": self.metrics_summary(),
        }

    def to_dict(self) -> dict[str, Any]:
        """The info as plain JSON-ready data."""
        d = asdict(self)
        d["aliases"], d["problems"] = list(self.aliases), list(self.problems)
        return d


@dataclass(frozen=True)
class IncompleteInfo:
    """A leftover of a publish that did not finish (or is still running).

    Attributes:
        index: the index name.
        name: the leftover's directory/prefix name under the index.
        n_files: the objects it holds.
        total_bytes: their total size.
        last_modified: UTC ISO time of its newest object ("" when it holds none).
    """

    index: str
    name: str
    n_files: int
    total_bytes: int
    last_modified: str

    def as_row(self) -> dict[str, str]:
        """String columns for a table: name, files, size, last_modified."""
        return {"name": self.name, "files": str(self.n_files), "size": _human_bytes(self.total_bytes), "last_modified": self.last_modified}


@dataclass(frozen=True)
class GcItem:
    """One thing :meth:`SnapshotStore.gc` looked at: removed, or kept and why.

    Attributes:
        kind: ``incomplete`` (a leftover of an unfinished publish) or ``version``.
        name: the version id, or the leftover's name under the index.
        n_files: the objects it holds.
        total_bytes: their total size.
        reason: why it is (or would be) removed, or why it is kept.
    """

    kind: str
    name: str
    n_files: int
    total_bytes: int
    reason: str

    def as_row(self) -> dict[str, str]:
        """String columns for a table: kind, name, files, size, reason."""
        return {"kind": self.kind, "name": self.name, "files": str(self.n_files),
                "size": _human_bytes(self.total_bytes), "reason": self.reason}


@dataclass(frozen=True)
class GcReport:
    """The result of :meth:`SnapshotStore.gc`.

    Attributes:
        index: the index name.
        dry_run: True when nothing was removed (``removed`` lists what would be).
        removed: what was (or would be) removed.
        kept: what was looked at and kept, with the reason.
    """

    index: str
    dry_run: bool
    removed: tuple[GcItem, ...] = ()
    kept: tuple[GcItem, ...] = ()

    @property
    def bytes_removed(self) -> int:
        """Total size of what was (or would be) removed."""
        return sum(i.total_bytes for i in self.removed)

    def summary(self) -> str:
        """One line: how many things (and bytes) were removed, or would be in a dry run."""
        size = _human_bytes(self.bytes_removed)
        return f"dry run: {len(self.removed)} would be removed ({size})" if self.dry_run else f"removed {len(self.removed)} ({size})"

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data."""
        return {"index": self.index, "dry_run": self.dry_run, "removed": [asdict(i) for i in self.removed],
                "kept": [asdict(i) for i in self.kept]}


@dataclass(frozen=True)
class VerifyReport:
    """The result of :meth:`SnapshotStore.verify`.

    Attributes:
        index: the index name.
        version: the version checked.
        ok: True when the manifest is consistent and every file matches it, with nothing extra.
        problems: one readable sentence per problem (empty when ok).
        files_checked: how many files were hashed.
        bytes_checked: how many bytes were hashed.
        seconds: wall time of the check.
    """

    index: str
    version: str
    ok: bool
    problems: tuple[str, ...] = ()
    files_checked: int = 0
    bytes_checked: int = 0
    seconds: float = 0.0

    def __bool__(self) -> bool:
        return self.ok

    def as_row(self) -> dict[str, str]:
        """String columns for a table: version, ok, files, size, seconds, problems."""
        return {
            "version": self.version,
            "ok": "ok" if self.ok else "FAILED",
            "files": str(self.files_checked),
            "size": _human_bytes(self.bytes_checked),
            "seconds": f"{self.seconds:.2f}",
            "problems": "\n".join(self.problems),
        }

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data."""
        d = asdict(self)
        d["problems"] = list(self.problems)
        return d


def default_cache_dir() -> Path:
    """Where :meth:`SnapshotStore.fetch` puts remote snapshots by default.

    Returns:
        ``$CORPUSFORGE_SNAPSHOT_CACHE``, else ``~/.cache/corpusforge/snapshots``.
    """
    env = os.environ.get("CORPUSFORGE_SNAPSHOT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "corpusforge" / "snapshots"


def _dumps(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, allow_nan=True) + "\n").encode("utf-8")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _listing_problems(manifest: dict[str, Any], listing: dict[str, int]) -> list[str]:
    """Missing, wrong-size and unexpected files, from a listing alone (no reads)."""
    problems = []
    expected = {e["path"]: e["size"] for e in manifest["files"]}
    for rel, size in expected.items():
        if rel not in listing:
            problems.append(f"missing file {rel!r}")
        elif listing[rel] != size:
            problems.append(f"size mismatch for {rel!r}: manifest {size} bytes, stored {listing[rel]} bytes")
    for rel in sorted(set(listing) - set(expected) - {MANIFEST_NAME}):
        problems.append(f"unexpected file {rel!r} (not in the manifest)")
    return problems


class SnapshotStore:
    """Publish, list, verify, alias and fetch index snapshots under one root.

    Args:
        root: a local directory (the default kind) or ``s3://bucket/prefix``.
        endpoint_url: the S3 endpoint for S3-compatible servers (MinIO, moto...).
        client: a ready boto3 S3 client (instead of one made from ``endpoint_url``).
        transfer_config: a boto3 ``TransferConfig`` (multipart thresholds, concurrency).
        workers: threads hashing (and, on S3, downloading) files in parallel.

    Example:
        >>> store = SnapshotStore("snapshots")
        >>> version = store.publish(build_dir, build_manifest(build_dir, index_name="scifact", ...))
        >>> store.promote("scifact", version, "production")
        >>> path = store.fetch("scifact", store.resolve("scifact", "production"))
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        endpoint_url: str | None = None,
        *,
        client: Any = None,
        transfer_config: Any = None,
        workers: int = 4,
    ) -> None:
        self.backend: Backend = open_backend(root, endpoint_url, client=client, transfer_config=transfer_config)
        self.root = self.backend.root
        self.workers = max(1, workers)

    def __repr__(self) -> str:
        return f"SnapshotStore({self.root!r})"

    # ---------------------------------------------------------------- publish

    def publish(self, build_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> str:
        """Publish a build as a new immutable version of ``manifest["index_name"]``.

        The version id is derived from the manifest (:func:`version_id`; any ``version`` already
        in it is replaced). Locally the build is copied into ``<index>/.tmp-<version>/``, fsynced,
        made read-only and renamed into place; on S3 every file is uploaded (multipart when big)
        and ``manifest.json`` last. Every file is hashed while copied and must match the manifest.

        Args:
            build_dir: the local build directory the manifest describes.
            manifest: from :func:`build_manifest` (metrics may have been added since).

        Returns:
            The new version id.

        Raises:
            ManifestError: when the manifest is malformed or does not describe ``build_dir``
                exactly (a file added, removed or changed since it was built).
            SnapshotExistsError: when the version exists or is being published.
        """
        m = normalize(manifest)
        m.pop("version", None)
        index = check_name("index name", m.get("index_name"))
        problems = manifest_problems(m)
        if problems:
            raise ManifestError("cannot publish a malformed manifest: " + "; ".join(problems))
        on_disk = set(scan_build(build_dir))
        listed = {e["path"] for e in m["files"]}
        if on_disk != listed:
            raise ManifestError(
                f"manifest does not describe {str(build_dir)!r}: files not in the manifest "
                f"{sorted(on_disk - listed)[:5]}, files missing from the build {sorted(listed - on_disk)[:5]}"
            )
        version = version_id(m)
        m["version"] = version
        entries = [FileEntry(e["path"], e["size"], e["sha256"]) for e in m["files"]]
        t0 = time.perf_counter()
        try:
            self.backend.put_tree(Path(build_dir), entries, f"{index}/{version}", _dumps(m))
        except FileExistsError as e:
            raise SnapshotExistsError(f"refusing to publish over {index}/{version}: {e}") from None
        log.info("published %s/%s (%d files) to %s in %.2fs", index, version, len(entries), self.root, time.perf_counter() - t0)
        return version

    # ---------------------------------------------------------------- listing

    def indexes(self) -> list[str]:
        """Names of the indexes under the root.

        Returns:
            Sorted index names.
        """
        return [n for n in self.backend.children("") if not n.startswith(".")]

    def _groups(self, index: str) -> dict[str, dict[str, ObjectInfo]]:
        """Objects under ``<index>/`` grouped by their first path component (one listing)."""
        groups: dict[str, dict[str, ObjectInfo]] = {}
        for obj in self.backend.list(index):
            name, _, rel = obj.key[len(index) + 1 :].partition("/")
            if rel:
                groups.setdefault(name, {})[rel] = obj
        return groups

    def _check_version(self, index: str, version: str) -> None:
        """Reject anything that is not a version id before it becomes part of a key."""
        check_name("index name", index)
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise SnapshotNotFoundError(
                f"{version!r} is not a version id of index {index!r} (like 20261121T203015.123456Z-1a2b3c4d)"
            )

    def _load_manifest(self, index: str, version: str) -> tuple[dict[str, Any] | None, list[str]]:
        self._check_version(index, version)
        try:
            manifest = json.loads(self.backend.read_bytes(f"{index}/{version}/{MANIFEST_NAME}"))
        except FileNotFoundError:
            return None, [UNFINISHED]
        except UnsafePathError as e:
            return None, [f"{MANIFEST_NAME} cannot be read: {e}"]
        except (ValueError, UnicodeDecodeError) as e:
            return None, [f"{MANIFEST_NAME} is not valid JSON: {e}"]
        return manifest, manifest_problems(manifest, index=index, version=version)

    def versions(self, index: str) -> list[SnapshotInfo]:
        """The published versions of an index, oldest first (newest last).

        Lists every version whose manifest was written; ``complete`` is False (with ``problems``)
        for a committed version that was damaged since (a file missing or resized, an extra file,
        an edited manifest). Unfinished publishes are not listed here: see :meth:`incomplete`.

        Args:
            index: the index name.

        Returns:
            One :class:`SnapshotInfo` per version, sorted by version id.
        """
        check_name("index name", index)
        groups = self._groups(index)
        pointing: dict[str, list[str]] = {}
        for alias, version in self.aliases(index).items():
            pointing.setdefault(version, []).append(alias)
        unsafe: dict[str, list[str]] = {}  # links and special files, per version
        for key, what in self.backend.unsafe_entries(index).items():
            name, _, rel = key[len(index) + 1 :].partition("/")
            if VERSION_RE.match(name):
                unsafe.setdefault(name, []).append(f"{rel or 'the version directory'!r} is {what}")
        out = []
        for name in sorted(set(groups) | set(unsafe)):
            if not VERSION_RE.match(name) or (MANIFEST_NAME not in groups.get(name, {}) and name not in unsafe):
                continue
            if name in unsafe:
                problems = unsafe[name]
                out.append(SnapshotInfo(index, name, "", False, tuple(sorted(pointing.get(name, []))), problems=tuple(problems)))
                continue
            manifest, problems = self._load_manifest(index, name)
            if manifest is None or problems:
                out.append(SnapshotInfo(index, name, "", False, tuple(sorted(pointing.get(name, []))), problems=tuple(problems)))
                continue
            listing = {rel: o.size for rel, o in groups[name].items()}
            problems = _listing_problems(manifest, listing)
            out.append(
                SnapshotInfo(
                    index=index,
                    version=name,
                    created_at=str(manifest.get("created_at", "")),
                    complete=not problems,
                    aliases=tuple(sorted(pointing.get(name, []))),
                    metrics=flatten_metrics(manifest.get("metrics")),
                    n_files=len(manifest["files"]),
                    total_bytes=sum(e["size"] for e in manifest["files"]),
                    problems=tuple(problems),
                )
            )
        return out

    def incomplete(self, index: str) -> list[IncompleteInfo]:
        """Leftovers of unfinished publishes: staging directories and versions without manifest.

        Args:
            index: the index name.

        Returns:
            One :class:`IncompleteInfo` per leftover, sorted by name.
        """
        check_name("index name", index)
        groups = self._groups(index)
        names = set(groups) | set(self.backend.children(index))  # children: empty staging dirs too
        out = []
        for name in sorted(names):
            objs = groups.get(name, {})
            staging = name.startswith(STAGING_PREFIX)
            unfinished = VERSION_RE.match(name) is not None and MANIFEST_NAME not in objs
            if staging or unfinished:
                newest = max((o.mtime for o in objs.values()), default=0.0)
                local = self.backend.local_path(f"{index}/{name}")
                if local is not None:  # a publish that has just made its (still empty) directory
                    try:
                        newest = max(newest, local.lstat().st_mtime)
                    except FileNotFoundError:  # removed since the listing
                        pass
                out.append(IncompleteInfo(index, name, len(objs), sum(o.size for o in objs.values()), _iso(newest) if newest else ""))
        return out

    def gc_incomplete(self, index: str, *, older_than_s: float = 0.0) -> list[str]:
        """Delete the leftovers of unfinished publishes (see :meth:`incomplete`).

        A publish still running looks exactly like an interrupted one; pass ``older_than_s``
        (e.g. 3600) when publishes may run concurrently with the collection.

        Args:
            index: the index name.
            older_than_s: only delete leftovers whose newest object is at least this old.

        Returns:
            The names deleted.
        """
        now = time.time()
        removed = []
        for info in self.incomplete(index):
            newest = datetime.strptime(info.last_modified, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp() if info.last_modified else 0.0
            if now - newest >= older_than_s:
                self.backend.delete_prefix(f"{index}/{info.name}")
                removed.append(info.name)
                log.info("removed unfinished publish %s/%s (%d files)", index, info.name, info.n_files)
        return removed

    def _protected(self, index: str, history: int) -> dict[str, str]:
        """Versions an alias points at or has among its last ``history`` entries, with why."""
        records = self._alias_records(index)
        out: dict[str, str] = {}
        for alias, record in records.items():
            out.setdefault(str(record["version"]), f"alias {alias!r} points at it")
        for alias, record in records.items():
            for entry in (record.get("history") or [])[-history:] if history > 0 else []:
                out.setdefault(str(entry["version"]), f"in the last {history} history entries of alias {alias!r}")
        return out

    def gc(self, index: str, *, keep: int | None = None, history: int = GC_HISTORY, grace_s: float = GC_GRACE_S,
           dry_run: bool = True) -> GcReport:
        """Remove leftovers of unfinished publishes and, with ``keep``, old versions nobody needs.

        - Leftovers (:meth:`incomplete`: staging directories, versions without manifest) whose
          newest object is at least ``grace_s`` old. Younger ones are kept: a publish running
          now looks exactly like an interrupted one.
        - With ``keep=N``: versions older than the N newest that no alias points at and that
          are not among the last ``history`` entries of any alias's history (what
          :meth:`rollback` walks back through). Without ``keep`` no version is removed.

        A version is removed with ``Backend.delete_tree`` (it stops being a version first) after
        its protection is checked again under the alias lock; alias updates check under the same
        lock that their version is still committed, so on a local root a concurrent promote
        either lands before the check (and the version is kept) or is refused. On S3, which has
        no lock, a promote racing the removal of the same old version within milliseconds can
        still point at it (the server then refuses to load it).

        Args:
            index: the index name.
            keep: how many of the newest versions to keep regardless; None removes no version.
            history: how many of each alias's latest history entries are protected (0: none).
            grace_s: leave leftovers written to within this many seconds.
            dry_run: only report what would be removed.

        Returns:
            A :class:`GcReport`.

        Raises:
            ValueError: for a negative ``keep``, ``history`` or ``grace_s``.
        """
        check_name("index name", index)
        if (keep is not None and keep < 0) or history < 0 or grace_s < 0:
            raise ValueError(f"keep, history and grace_s must be >= 0 (got {keep}, {history}, {grace_s})")
        now = time.time()
        removed: list[GcItem] = []
        kept: list[GcItem] = []
        for info in self.incomplete(index):
            newest = datetime.strptime(info.last_modified, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp() if info.last_modified else 0.0
            age = now - newest
            if age < grace_s:
                reason = f"last written {age:.0f}s ago, within the {grace_s:.0f}s grace period: may be a publish in progress"
                kept.append(GcItem("incomplete", info.name, info.n_files, info.total_bytes, reason))
                continue
            item = GcItem("incomplete", info.name, info.n_files, info.total_bytes, "unfinished publish" + (f", last written {age:.0f}s ago" if newest else ""))
            if not dry_run:
                self.backend.delete_prefix(f"{index}/{info.name}")
                log.info("removed unfinished publish %s/%s (%d files)", index, info.name, info.n_files)
            removed.append(item)
        if keep is not None:
            versions = self.versions(index)  # oldest first
            newest_n = {v.version for v in versions[len(versions) - keep:]} if keep else set()
            protected = self._protected(index, history)
            for v in versions:
                if v.version in newest_n:
                    kept.append(GcItem("version", v.version, v.n_files, v.total_bytes, f"one of the {keep} newest"))
                elif v.version in protected:
                    kept.append(GcItem("version", v.version, v.n_files, v.total_bytes, protected[v.version]))
                elif dry_run:
                    removed.append(GcItem("version", v.version, v.n_files, v.total_bytes, f"older than the {keep} newest, not aliased"))
                else:
                    with self.backend.exclusive(f"{index}/{ALIASES_DIR}"):
                        now_protected = self._protected(index, history)  # an alias may have moved since
                        if v.version not in now_protected:
                            self.backend.delete_tree(f"{index}/{v.version}")
                    if v.version in now_protected:
                        kept.append(GcItem("version", v.version, v.n_files, v.total_bytes, now_protected[v.version]))
                    else:
                        log.info("removed version %s/%s (%d files)", index, v.version, v.n_files)
                        removed.append(GcItem("version", v.version, v.n_files, v.total_bytes, f"older than the {keep} newest, not aliased"))
        return GcReport(index, dry_run, tuple(removed), tuple(kept))

    def manifest(self, index: str, version: str) -> dict[str, Any]:
        """The manifest of a published version.

        Args:
            index: the index name.
            version: the version id.

        Returns:
            The manifest dict.

        Raises:
            SnapshotNotFoundError: when the version has no manifest.
            ManifestError: when the manifest is not valid JSON.
        """
        check_name("index name", index)
        manifest, problems = self._load_manifest(index, version)
        if manifest is None:
            if problems and problems[0] != UNFINISHED:
                raise ManifestError(f"{index}/{version}: {problems[0]}")
            raise SnapshotNotFoundError(f"no published version {version!r} of index {index!r} in {self.root}")
        return manifest

    # ---------------------------------------------------------------- verify

    def _check_tree(self, backend: Backend, prefix: str, manifest: dict[str, Any]) -> tuple[list[str], int, int]:
        """Compare the objects under ``prefix`` with a manifest, hashing every listed file."""
        base = prefix + "/" if prefix else ""
        listing = {o.key[len(base):]: o.size for o in backend.list(prefix)}
        problems = _listing_problems(manifest, listing)
        todo = [e for e in manifest["files"] if listing.get(e["path"]) == e["size"]]

        def check(entry: dict[str, Any]) -> tuple[str | None, int]:
            try:
                sha, size = sha256_stream(backend.iter_chunks(base + entry["path"]))
            except FileNotFoundError:
                return f"missing file {entry['path']!r}", 0
            except UnsafePathError as e:  # became a link after the listing
                return str(e), 0
            if sha != entry["sha256"] or size != entry["size"]:
                return f"checksum mismatch for {entry['path']!r}: manifest sha256 {entry['sha256'][:12]}..., stored {sha[:12]}...", size
            return None, size

        # hashlib and socket reads release the GIL: threads overlap I/O and hashing.
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            results = list(pool.map(check, todo))
        problems += [p for p, _ in results if p]
        return problems, len(todo), sum(n for _, n in results)

    def verify(self, index: str, version: str) -> VerifyReport:
        """Check a version byte for byte against its manifest (streamed; S3 objects are downloaded
        and hashed on the fly, never stored).

        Checks: the manifest parses and matches its location and version id; every listed file
        exists with the listed size and sha256; no file is stored that the manifest does not list;
        nothing in the version (the version directory included) is a symbolic link or a special
        file -- a link would let a file outside the root stand in for a checked one; the parts
        agree with each other (`consistency.consistency_problems`: row counts, model).

        Args:
            index: the index name.
            version: the version id.

        Returns:
            A :class:`VerifyReport` (falsy when not ok).

        Raises:
            SnapshotNotFoundError: when nothing at all is stored under the version.
        """
        check_name("index name", index)
        t0 = time.perf_counter()
        manifest, problems = self._load_manifest(index, version)
        unsafe = self.backend.unsafe_entries(f"{index}/{version}")
        if manifest is None and not unsafe and not self.backend.list(f"{index}/{version}"):
            raise SnapshotNotFoundError(f"no version {version!r} of index {index!r} in {self.root}")
        problems = [f"{key!r} is {what}" for key, what in unsafe.items()] + problems
        files = bytes_ = 0
        if manifest is not None and not any(p.startswith("malformed") or p == "manifest lists no files" for p in problems):
            more, files, bytes_ = self._check_tree(self.backend, f"{index}/{version}", manifest)
            problems = problems + more
            if not problems:  # intact files: do the parts also belong together?
                problems = self._consistency_problems(index, version, manifest)
        return VerifyReport(index, version, not problems, tuple(problems), files, bytes_, time.perf_counter() - t0)

    def _consistency_problems(self, index: str, version: str, manifest: dict[str, Any]) -> list[str]:
        """`consistency.consistency_problems` of a stored version (reads only its small JSON files)."""
        listed = {e["path"] for e in manifest["files"]}

        def read_json(rel: str) -> Any:
            return json.loads(self.backend.read_bytes(f"{index}/{version}/{rel}")) if rel in listed else None

        return consistency_problems(manifest, read_json)

    # ---------------------------------------------------------------- aliases

    def _alias_key(self, index: str, alias: str) -> str:
        return f"{index}/{ALIASES_DIR}/{alias}.json"

    def alias_record(self, index: str, alias: str) -> dict[str, Any]:
        """The stored record of an alias: version, updated_at and the history of earlier versions.

        Args:
            index: the index name.
            alias: the alias name.

        Returns:
            ``{"index", "alias", "version", "updated_at", "history": [{"version", "set_at",
            "replaced_at"}, ...]}``, history oldest first.

        Raises:
            AliasError: when the alias does not exist.
        """
        check_name("index name", index)
        check_name("alias", alias)
        try:
            return json.loads(self.backend.read_bytes(self._alias_key(index, alias)))
        except FileNotFoundError:
            known = sorted(self.aliases(index))
            raise AliasError(f"index {index!r} has no alias {alias!r} (aliases: {known or 'none'})") from None

    def aliases(self, index: str) -> dict[str, str]:
        """Every alias of an index and the version it points at.

        Args:
            index: the index name.

        Returns:
            ``{alias: version}``, sorted by alias.
        """
        return {alias: record["version"] for alias, record in self._alias_records(index).items()}

    def _alias_records(self, index: str) -> dict[str, dict[str, Any]]:
        """Every alias record of an index, sorted by alias."""
        check_name("index name", index)
        out = {}
        for obj in self.backend.list(f"{index}/{ALIASES_DIR}"):
            name = obj.key.rsplit("/", 1)[-1]
            if name.endswith(".json") and not name.startswith("."):  # skip temp files of writers
                try:
                    out[name[: -len(".json")]] = json.loads(self.backend.read_bytes(obj.key))
                except FileNotFoundError:  # deleted while listing
                    continue
        return dict(sorted(out.items()))

    def resolve(self, index: str, alias: str) -> str:
        """The version an alias points at.

        Args:
            index: the index name.
            alias: the alias name.

        Returns:
            The version id.

        Raises:
            AliasError: when the alias does not exist.
        """
        return str(self.alias_record(index, alias)["version"])

    def _require_verified(self, index: str, version: str, action: str) -> None:
        report = self.verify(index, version)
        if not report.ok:
            raise VerificationError(report, action)

    def _alias_doc(self, index: str, alias: str, version: str, history: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "index": index,
            "alias": alias,
            "version": version,
            "updated_at": _utc_now_iso(),
            "history": history[-ALIAS_HISTORY_LIMIT:],
        }

    def _update_alias(self, index: str, alias: str,
                      change: Callable[[dict[str, Any] | None], dict[str, Any] | None]) -> dict[str, Any] | None:
        """Read-modify-write an alias record, serialized against every other alias update of the
        index (a file lock on a local root, conditional writes on S3: see ``Backend.update_bytes``).

        Args:
            index: the index name.
            alias: the alias name.
            change: ``f(current record or None) -> new record``, or None to leave it; it may run
                more than once (S3, when another writer got in first).

        Returns:
            The record now stored (None when there is none).
        """

        def update(raw: bytes | None) -> bytes | None:
            new = change(json.loads(raw) if raw is not None else None)
            return None if new is None else _dumps(new)

        raw = self.backend.update_bytes(self._alias_key(index, alias), update)
        return json.loads(raw) if raw is not None else None

    def _require_committed(self, index: str, version: str, action: str) -> None:
        # Checked while the alias update holds the lock (or right before the conditional write):
        # a version removed by `gc` after it verified must not become an alias target.
        if not self.backend.exists(f"{index}/{version}/{MANIFEST_NAME}"):
            raise SnapshotNotFoundError(f"{action}: version {version!r} of index {index!r} was removed meanwhile")

    def set_alias(self, index: str, alias: str, version: str) -> dict[str, Any]:
        """Point an alias at a version, atomically, after verifying the version in full.

        The previous version goes onto the alias history (for :meth:`rollback`). Setting an alias
        to the version it already points at changes nothing. Concurrent writers of one index's
        aliases are serialized (a file lock locally, conditional writes on S3), so every step is
        kept in the history.

        Args:
            index: the index name.
            alias: the alias name (``production``, ``staging``...).
            version: the version id.

        Returns:
            The new alias record.

        Raises:
            SnapshotNotFoundError: when the version does not exist (or was removed meanwhile).
            VerificationError: when the version is incomplete or corrupted (the alias is unchanged).
        """
        check_name("index name", index)
        check_name("alias", alias)
        action = f"refusing to point alias {alias!r} at it"
        self._require_verified(index, version, action)

        def change(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if current is not None and current.get("version") == version:
                return None
            self._require_committed(index, version, action)
            history = list(current.get("history", [])) if current else []
            if current is not None:
                history.append({"version": current["version"], "set_at": current.get("updated_at"), "replaced_at": _utc_now_iso()})
            return self._alias_doc(index, alias, version, history)

        record = self._update_alias(index, alias, change)
        assert record is not None  # change() never leaves a missing alias missing
        log.info("alias %s/%s -> %s", index, alias, record["version"])
        return record

    def promote(self, index: str, version: str, alias: str) -> dict[str, Any]:
        """Point ``alias`` at ``version`` (a version id, or another alias's current version).

        ``promote(idx, "staging", "production")`` promotes whatever staging points at.

        Args:
            index: the index name.
            version: a version id or an alias name.
            alias: the alias to move.

        Returns:
            The new alias record.

        Raises:
            AliasError, SnapshotNotFoundError, VerificationError: as :meth:`set_alias`.
        """
        target = version if VERSION_RE.match(version) else self.resolve(index, version)
        return self.set_alias(index, alias, target)

    def rollback(self, index: str, alias: str) -> str:
        """Move an alias back to the version it pointed at before (verified first).

        The version rolled back from is not pushed onto the history, so repeated rollbacks walk
        further back instead of flipping between two versions.

        Args:
            index: the index name.
            alias: the alias name.

        Returns:
            The version the alias now points at.

        Raises:
            AliasError: when the alias does not exist or has no previous version.
            VerificationError: when the previous version no longer verifies (alias unchanged).
        """
        action = f"refusing to roll alias {alias!r} back to it"
        verified: set[str] = set()

        def previous_of(record: dict[str, Any] | None) -> str:
            if record is None:
                raise AliasError(f"index {index!r} has no alias {alias!r}")
            if not record.get("history"):
                raise AliasError(
                    f"cannot roll back alias {alias!r} of index {index!r}: it has no previous version "
                    f"(it has pointed at {record['version']} only)"
                )
            return str(record["history"][-1]["version"])

        def change(current: dict[str, Any] | None) -> dict[str, Any]:
            previous = previous_of(current)
            if previous not in verified:  # the alias moved since it was read: verify its new past
                raise _AliasMoved
            self._require_committed(index, previous, action)
            return self._alias_doc(index, alias, previous, list(current["history"])[:-1])

        # Verifying (hashing every file) happens outside the alias lock; if the alias moves
        # meanwhile, its new previous version is verified and the update tried again.
        for _ in range(ALIAS_HISTORY_LIMIT):
            previous = previous_of(self.alias_record(index, alias))
            self._require_verified(index, previous, action)
            verified.add(previous)
            try:
                record = self._update_alias(index, alias, change)
            except _AliasMoved:
                continue
            assert record is not None
            log.info("alias %s/%s rolled back -> %s", index, alias, record["version"])
            return str(record["version"])
        raise AliasError(f"alias {alias!r} of index {index!r} kept moving during the rollback; try again")

    # ---------------------------------------------------------------- fetch

    def fetch(self, index: str, version: str, dest_dir: str | os.PathLike[str] | None = None) -> Path:
        """A verified, read-only local copy of a version, for serving.

        Local root: verifies the snapshot in place and returns its directory. S3 root: downloads
        into ``<dest_dir>/<index>/.tmp-<version>-<random>/``, verifies every file, makes it
        read-only and renames it to ``<dest_dir>/<index>/<version>/``; a cached copy that still
        verifies is reused, a damaged one is replaced.

        Args:
            index: the index name.
            version: the version id (use :meth:`resolve` for an alias).
            dest_dir: the cache directory for remote roots (default :func:`default_cache_dir`).

        Returns:
            The local snapshot directory.

        Raises:
            SnapshotNotFoundError: when the version does not exist.
            VerificationError: when the snapshot (or its download) fails verification.
        """
        self._check_version(index, version)
        local = self.backend.local_path(f"{index}/{version}")
        if local is not None:
            self._require_verified(index, version, "refusing to fetch it")
            return local
        manifest, problems = self._load_manifest(index, version)
        if manifest is None and not self.backend.exists(f"{index}/{version}/{MANIFEST_NAME}"):
            raise SnapshotNotFoundError(f"no published version {version!r} of index {index!r} in {self.root}")
        if problems:
            raise VerificationError(VerifyReport(index, version, False, tuple(problems)), "refusing to fetch it")
        cache = Path(dest_dir) if dest_dir is not None else default_cache_dir()
        final = cache / index / version
        if final.is_symlink():  # not a copy this store made: never read through it
            log.warning("cached copy %s is a symbolic link; downloading again", final)
            remove_tree(final)
        if final.exists():
            cached, _, _ = self._check_tree(LocalBackend(final), "", manifest)
            if not cached:
                return final
            log.warning("cached copy %s is damaged (%s); downloading again", final, cached[0])
            remove_tree(final)
        return self._download(index, version, manifest, final)

    def _download(self, index: str, version: str, manifest: dict[str, Any], final: Path) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{STAGING_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        t0 = time.perf_counter()
        try:
            paths: Iterable[str] = [e["path"] for e in manifest["files"]]
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                list(pool.map(lambda rel: self.backend.download(f"{index}/{version}/{rel}", tmp / rel), paths))
            (tmp / MANIFEST_NAME).write_bytes(_dumps(manifest))
            started = time.perf_counter()
            problems, files, nbytes = self._check_tree(LocalBackend(tmp), "", manifest)
            if problems:
                report = VerifyReport(index, version, False, tuple(problems), files, nbytes, time.perf_counter() - started)
                raise VerificationError(report, "refusing the downloaded copy")
            make_read_only(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.exists():
                    raise
                # Another process fetched the same version meanwhile: keep its copy.
                remove_tree(tmp)
        except BaseException:
            remove_tree(tmp)
            raise
        log.info("fetched %s/%s into %s in %.2fs", index, version, final, time.perf_counter() - t0)
        return final
