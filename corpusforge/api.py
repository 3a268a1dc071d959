"""Search a published snapshot from Python: ``corpusforge.open_index(root, index, alias)``.

The alias is resolved through `corpusforge.snapshots.SnapshotStore` (a local directory or
``s3://bucket/prefix``); the version is verified (every file's sha256 against its manifest; an S3
version is downloaded into a cache first) and opened the way ``corpusforge serve`` opens it, with
the same query encoder and a smoke query per mode, so a query returns what the endpoint returns.

Example:
    >>> import corpusforge
    >>> index = corpusforge.open_index("workspace/snapshots", "scifact")   # alias production
    >>> for hit in index.search("vitamin D and bone health", k=5, mode="hybrid"):
    ...     print(hit.rank, hit.doc_id, round(hit.score, 3))
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corpusforge.retrieval.search import Hit
from corpusforge.serve.loader import LoadedSnapshot, open_snapshot
from corpusforge.snapshots import AliasError, SnapshotNotFoundError, SnapshotStore


@dataclass
class Index:
    """A published snapshot opened for searching (returned by `open_index`).

    Attributes:
        snapshot: the loaded snapshot (searcher, manifest, query encoder, reranker).
        root: the snapshot store's root it came from.
        alias: the alias it was opened through (None when opened by version).
    """

    snapshot: LoadedSnapshot
    root: str
    alias: str | None

    @property
    def name(self) -> str:
        """The index name."""
        return self.snapshot.index

    @property
    def version(self) -> str:
        """The version id the alias pointed at when the index was opened."""
        return self.snapshot.version

    @property
    def modes(self) -> tuple[str, ...]:
        """The search modes this snapshot answers (``dense``, ``bm25``, ``hybrid``)."""
        return self.snapshot.modes

    @property
    def manifest(self) -> dict[str, Any]:
        """The snapshot's manifest (spec, model, metrics, files with their sha256)."""
        return self.snapshot.manifest

    def summary(self) -> dict[str, Any]:
        """What the endpoint's ``/snapshot`` shows: version, model, index parameters, sizes, modes."""
        return self.snapshot.summary()

    def search(self, query: str, k: int = 10, mode: str | None = None, *, filters: dict[str, Any] | None = None,
               acl: Iterable[str] | Any | None = None, rerank: bool = False, level: str = "doc",
               fusion: str | None = None) -> list[Hit]:
        """Search one query.

        Args:
            query: the query text.
            k: hits to return.
            mode: ``dense``, ``bm25`` or ``hybrid`` (default: hybrid when the snapshot has both
                indexes, else its only mode).
            filters: metadata exact-match filters (``{"lang": "en"}``; a list value matches any).
            acl: the caller's ACL tags; None (the default) sees public chunks only, and
                `corpusforge.retrieval.search.UNRESTRICTED` skips the check (trusted callers only).
            rerank: rerank with the snapshot's late-interaction reranker.
            level: ``doc`` (chunks aggregated to documents) or ``chunk``.
            fusion: ``rrf`` or ``weighted`` for hybrid (default: the spec's).

        Returns:
            Up to k hits, best first.

        Raises:
            ValueError: a mode the snapshot lacks, ``rerank`` without a reranker, k < 1, ...
        """
        return self.search_batch([query], k, mode, filters=filters, acl=acl, rerank=rerank, level=level,
                                 fusion=fusion)[0]

    def search_batch(self, queries: list[str], k: int = 10, mode: str | None = None, *,
                     filters: dict[str, Any] | None = None, acl: Iterable[str] | Any | None = None,
                     rerank: bool = False, level: str = "doc", fusion: str | None = None) -> list[list[Hit]]:
        """Search several queries at once (one encoder call); arguments as for `search`.

        Returns:
            One best-first hit list per query.
        """
        mode = mode or ("hybrid" if "hybrid" in self.modes else self.modes[0])
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} is not available in {self.name}/{self.version}; it answers "
                             + ", ".join(self.modes))
        searcher: Any = self.snapshot.searcher
        if rerank:
            if self.snapshot.reranker is None:
                raise ValueError(f"{self.name}/{self.version} has no reranker; search with rerank=False")
            from corpusforge.retrieval.rerank import RerankingSearcher

            searcher = RerankingSearcher(searcher, self.snapshot.reranker)
        return searcher.search_batch(list(queries), k=k, mode=mode, filters=filters, acl=acl, level=level,
                                     fusion=fusion)

    def __repr__(self) -> str:
        via = f"alias {self.alias!r} -> " if self.alias else ""
        return f"Index({self.name!r}, {via}{self.version!r} @ {self.root!r}, modes={list(self.modes)})"


def open_index(root: str | os.PathLike[str], index: str, alias: str = "production", *, version: str | None = None,
               endpoint_url: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
               query_runtime: str = "auto", query_tower: bool = True) -> Index:
    """Open a published index by snapshot root, index name and alias (or version), verified.

    Args:
        root: the snapshot store's root: a directory (e.g. ``workspace/snapshots``) or
            ``s3://bucket/prefix``.
        index: the index name (the spec's ``publish.index_name``, else its ``name``).
        alias: the alias to resolve (``production`` by default); ignored when ``version`` is given.
        version: open this version id instead of resolving an alias.
        endpoint_url: the S3 endpoint for S3-compatible servers (MinIO, ...); default
            ``AWS_ENDPOINT_URL``, else AWS.
        cache_dir: where an S3 snapshot is downloaded (default ``$CORPUSFORGE_SNAPSHOT_CACHE``,
            else ``~/.cache/corpusforge/snapshots``); a local root is read in place.
        query_runtime: the query encoder: ``auto`` (int8 ONNX on a CPU when it agrees with torch,
            as ``corpusforge serve`` does), ``onnx-int8`` or ``torch``.
        query_tower: encode queries with the snapshot's distilled query tower when it has one.

    Returns:
        The opened index; it keeps serving the version it opened even when the alias moves later.

    Raises:
        SnapshotNotFoundError: no such index or version under ``root`` (the message lists the
            indexes there).
        AliasError: the index has no such alias (the message lists its aliases).
        VerificationError: a file is missing, changed or unexpected (the snapshot is refused).
    """
    store = SnapshotStore(root, endpoint_url=endpoint_url)
    try:
        target = version or store.resolve(index, alias)
    except AliasError:
        known = store.indexes()
        if index in known:
            raise
        raise SnapshotNotFoundError(f"no index {index!r} in {store.root} (indexes: {', '.join(known) or 'none'})") \
            from None
    path = store.fetch(index, target, Path(cache_dir) if cache_dir is not None else None)  # verifies every file
    snapshot = open_snapshot(path, store.manifest(index, target), query_runtime=query_runtime,
                             query_tower=query_tower)
    return Index(snapshot, str(store.root), None if version else alias)
