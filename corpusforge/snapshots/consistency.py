"""Do a snapshot's parts belong together? One check for publish, verify and the server's load.

A snapshot can pass a byte-for-byte check against its manifest and still be unusable: a dense
index built over another run's chunks answers with the wrong rows, and the server refuses it
("dense index has 104 rows, the chunks table has 44"). `consistency_problems` compares what the
parts record about themselves, without loading any index:

- rows: the chunk store's ``chunks/_dataset.json`` ``rows``, the dense index's ``ntotal`` and the
  BM25 index's ``num_docs`` must be equal;
- model: the dense index's ``dim`` and the fingerprint of the encoder behind its vectors
  (``model_fingerprint``, recorded when it was built) must be the manifest's ``model.dim`` and
  ``model.encoder_fingerprint`` (both come from the embed stage that made the vectors).

A fact a part does not record is not compared (older builds, hand-made test builds).
`SnapshotStore.verify` runs it after the checksums pass, the publish stage before the version is
written (so before any alias moves), and `serve.loader.open_snapshot` before loading anything.

Importing this module imports nothing heavy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHUNKS_META = "chunks/_dataset.json"
DENSE_META = "dense/dense.json"
BM25_META = "bm25/bm25.json"


def consistency_problems(manifest: dict[str, Any], read_json: Callable[[str], Any]) -> list[str]:
    """Disagreements between a snapshot's parts (row counts, model fingerprints).

    Args:
        manifest: the snapshot's manifest.
        read_json: ``f(relative path) -> parsed JSON``, or None when the snapshot has no such file.

    Returns:
        One readable sentence per disagreement; empty when the parts agree.
    """
    problems: list[str] = []
    try:
        chunks, dense, bm25 = (read_json(rel) for rel in (CHUNKS_META, DENSE_META, BM25_META))
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return [f"unreadable part metadata: {exc}"]
    rows = _int(chunks, "rows")
    counts = {"dense": _dense_rows(dense), "bm25": _int(bm25, "num_docs")}
    if rows is not None:
        problems += [f"{name} index has {count} rows, the chunks table has {rows}"
                     for name, count in counts.items() if count is not None and count != rows]
    elif None not in counts.values() and counts["dense"] != counts["bm25"]:
        problems.append(f"dense index has {counts['dense']} rows, the BM25 index has {counts['bm25']}")
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    if isinstance(dense, dict):
        dim, want_dim = _int(dense, "dim"), _int(model, "dim")
        if dim is not None and want_dim is not None and dim != want_dim:
            problems.append(f"dense index has dimension {dim}, the manifest's model has {want_dim}")
        built, want = dense.get("model_fingerprint"), model.get("encoder_fingerprint")
        if built and want and built != want:
            problems.append(f"dense index was built from vectors of model {built}, the manifest's model is {want}")
    return problems


def local_consistency_problems(path: str | Path, manifest: dict[str, Any] | None = None) -> list[str]:
    """`consistency_problems` of a snapshot directory on local disk (a build or a fetched copy).

    Args:
        path: the snapshot directory.
        manifest: its manifest (read from ``path/manifest.json`` when None).

    Returns:
        One sentence per disagreement; empty when the parts agree.
    """
    path = Path(path)
    if manifest is None:
        manifest = json.loads((path / "manifest.json").read_text())
    return consistency_problems(manifest, json_reader(lambda rel: (path / rel).read_bytes()))


def json_reader(read_bytes: Callable[[str], bytes]) -> Callable[[str], Any]:
    """A `consistency_problems` reader over a bytes reader that raises FileNotFoundError when absent.

    Args:
        read_bytes: ``f(relative path) -> bytes`` (a directory, a pinned tree, a store).

    Returns:
        ``f(relative path) -> parsed JSON``, None for a missing file.
    """
    def read_json(rel: str) -> Any:
        try:
            return json.loads(read_bytes(rel))
        except FileNotFoundError:
            return None

    return read_json


def _int(meta: Any, key: str) -> int | None:
    value = meta.get(key) if isinstance(meta, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dense_rows(meta: Any) -> int | None:
    """``ntotal`` of a ``dense.json``, else the last shard offset."""
    rows = _int(meta, "ntotal")
    offsets = meta.get("shard_offsets") if isinstance(meta, dict) else None
    if rows is None and isinstance(offsets, list) and offsets and isinstance(offsets[-1], int):
        rows = offsets[-1]
    return rows
