"""Query-time search over a chunk store with dense, BM25 and hybrid retrieval.

`Searcher` joins the indexes (whose ids are chunk *rows*) with the chunks table and returns
`Hit`s. The rules it applies:

* **Levels.** ``level='chunk'`` returns chunks. ``level='doc'`` (default) returns documents,
  scoring a document by its best chunk (max aggregation); the hit carries that chunk. Taking
  the first k distinct documents from a best-first chunk list is exact for max aggregation, so
  the candidate depth grows until k distinct documents are seen (or the index is exhausted).
* **Hybrid.** Each mode contributes its top ``cfg.candidates`` chunks; they are fused by
  reciprocal rank fusion, ``sum 1/(rrf_k + rank)`` with ranks from 1, or by a weighted sum of
  min-max normalised scores, ``w*dense + (1-w)*bm25`` with ``w = cfg.dense_weight`` (a chunk
  missing from one list gets 0 from it; a list whose scores are all equal normalises to 1).
  Fusion runs at chunk level, before document aggregation.
* **Filters.** ``filters={key: value}`` keeps chunks whose metadata JSON has ``key`` equal to
  ``value``; a list value means any-of; a metadata value that is itself a list matches when it
  contains a wanted value. All keys must match.
* **ACL.** ``acl`` is the set of tags the caller may see. A chunk is visible when it has no ACL
  tags (public) or shares at least one tag with the caller. ``acl=None`` means a caller with no
  tags, who sees public chunks only; trusted internal callers (evaluation) pass
  ``acl=UNRESTRICTED``. Invisible or filtered-out chunks are removed *before* fusion and
  aggregation, so they never appear and never influence other hits' scores; the candidate depth
  doubles (up to the corpus size) until k visible results exist or the index runs out.
"""

from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from corpusforge.data.datasets import read_table
from corpusforge.index.bm25 import BM25Index
from corpusforge.index.dense import DenseIndex
from corpusforge.spec import SearchConfig

MODES = ("dense", "bm25", "hybrid")
LEVELS = ("doc", "chunk")
FUSIONS = ("rrf", "weighted")
REQUIRED_COLUMNS = ("chunk_id", "doc_id", "text", "acl", "metadata")


class _Unrestricted:
    """Type of `UNRESTRICTED`: pass it as ``acl`` to skip ACL checks (trusted callers only)."""

    def __repr__(self) -> str:
        return "UNRESTRICTED"


UNRESTRICTED = _Unrestricted()


@dataclass(slots=True)
class Hit:
    """One search result.

    Attributes:
        doc_id: the document.
        chunk_id: the chunk (for doc-level hits, the document's best chunk).
        score: the mode's score (inner product, BM25, or fused).
        text: the chunk text.
        metadata: the chunk's metadata, parsed from JSON on first access.
        rank: 1-based position in the result list.
    """

    doc_id: str
    chunk_id: str
    score: float
    text: str
    metadata_json: str = field(repr=False)
    rank: int
    _metadata: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def metadata(self) -> dict[str, Any]:
        """The chunk metadata as a dict (parsed lazily: most callers never read it)."""
        if self._metadata is None:
            self._metadata = json.loads(self.metadata_json) if self.metadata_json else {}
        return self._metadata

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the serving layer)."""
        return {"doc_id": self.doc_id, "chunk_id": self.chunk_id, "score": self.score, "text": self.text,
                "metadata": self.metadata, "rank": self.rank}


class _StringColumn:
    """Zero-copy random access to an Arrow string column: its offsets as numpy + its data buffer.

    Fetching 10 strings this way costs a few microseconds; an Arrow ``take`` + conversion costs
    ~15 per column, which matters at our per-query overhead budget. Columns with nulls keep the
    Arrow path.
    """

    def __init__(self, arr: pa.Array):
        self.arr = arr
        self.fast = arr.null_count == 0 and (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type))
        if self.fast:
            bufs = arr.buffers()
            off_type = np.int64 if pa.types.is_large_string(arr.type) else np.int32
            self.offsets = np.frombuffer(bufs[1], dtype=off_type)[arr.offset:arr.offset + len(arr) + 1]
            self.data = memoryview(bufs[2]) if bufs[2] is not None else memoryview(b"")

    def get(self, rows: np.ndarray) -> list[str]:
        """The strings at `rows`."""
        if not self.fast:
            return self.arr.take(pa.array(rows)).to_pylist()
        starts = self.offsets[rows].tolist()
        ends = self.offsets[rows + 1].tolist()
        data = self.data
        return [str(data[a:b], "utf-8") for a, b in zip(starts, ends)]


def rrf_fuse(lists: Sequence[np.ndarray], rrf_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal rank fusion of best-first row lists.

    Args:
        lists: per-mode row arrays, best first (no -1 entries).
        rrf_k: the RRF constant (60 in the original paper).

    Returns:
        ``(scores, rows)`` best first; ties broken by lower row.
    """
    rows = np.concatenate(lists) if lists else np.empty(0, np.int64)
    contrib = np.concatenate([1.0 / (rrf_k + np.arange(1, len(r) + 1)) for r in lists]) if lists else np.empty(0)
    return _sum_by_row(rows, contrib)


def weighted_fuse(scores: Sequence[np.ndarray], lists: Sequence[np.ndarray], weights: Sequence[float]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sum of min-max normalised scores.

    Args:
        scores: per-mode score arrays aligned with `lists`.
        lists: per-mode row arrays.
        weights: per-mode weights.

    Returns:
        ``(scores, rows)`` best first; ties broken by lower row. A row absent from a list gets 0
        from it; a list with all-equal scores normalises to 1.
    """
    parts = []
    for s, w in zip(scores, weights):
        s = np.asarray(s, dtype=np.float64)
        lo, hi = (s.min(), s.max()) if s.size else (0.0, 0.0)
        norm = (s - lo) / (hi - lo) if hi > lo else np.ones_like(s)
        parts.append(w * norm)
    rows = np.concatenate(lists) if lists else np.empty(0, np.int64)
    contrib = np.concatenate(parts) if parts else np.empty(0)
    return _sum_by_row(rows, contrib)


def _sum_by_row(rows: np.ndarray, contrib: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum contributions per row; return (scores, rows) best first, ties by lower row."""
    if rows.size == 0:
        return np.empty(0), np.empty(0, np.int64)
    uniq, inv = np.unique(rows, return_inverse=True)
    total = np.bincount(inv, weights=contrib, minlength=uniq.size)
    order = np.lexsort((uniq, -total))
    return total[order], uniq[order]


class Searcher:
    """Dense / BM25 / hybrid search with doc aggregation, metadata filters and ACLs.

    Args:
        chunks: the chunks table (columns of ``schemas.CHUNKS``; at least chunk_id, doc_id, text,
            acl, metadata); row i is index row i.
        dense: the dense index over the same rows, or None.
        bm25: the BM25 index over the same rows, or None.
        query_encoder: ``f(list[str]) -> float32 (n, d)`` query embeddings, or None.
        cfg: fusion and candidate depth settings.

    Raises:
        ValueError: missing columns, or an index whose row count differs from the table's.
    """

    def __init__(self, chunks: pa.Table, dense: DenseIndex | None, bm25: BM25Index | None,
                 query_encoder: Callable[[list[str]], np.ndarray] | None, cfg: SearchConfig | None = None):
        missing = [c for c in REQUIRED_COLUMNS if c not in chunks.column_names]
        if missing:
            raise ValueError(f"chunks table lacks column(s) {missing}")
        self.n = chunks.num_rows
        for name, count in (("dense", dense and dense.ntotal), ("bm25", bm25 and bm25.num_docs)):
            if count is not None and count != self.n:
                raise ValueError(f"{name} index has {count} rows, the chunks table has {self.n}")
        self.dense, self.bm25, self.encoder = dense, bm25, query_encoder
        self.cfg = cfg or SearchConfig()
        # Columns as single contiguous arrays: one `take` per batch materialises all hits.
        col = {c: chunks.column(c).combine_chunks() for c in REQUIRED_COLUMNS}
        self._chunk_id, self._doc_id, self._text, self._meta = (col["chunk_id"], col["doc_id"], col["text"],
                                                                col["metadata"])
        enc = pc.dictionary_encode(col["doc_id"])
        self._doc_code = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        # ids as numpy object arrays: fancy indexing them costs well under a microsecond per query,
        # where an Arrow take + to_pylist costs ~20 (this is most of our per-query overhead)
        self._doc_names = enc.dictionary.to_numpy(zero_copy_only=False)
        self._chunk_ids = col["chunk_id"].to_numpy(zero_copy_only=False)
        self._texts = _StringColumn(col["text"])
        self._metas = _StringColumn(col["metadata"])
        self.n_docs = len(enc.dictionary)
        self._one_chunk_per_doc = self.n_docs == self.n
        acl = col["acl"]
        self._acl_values = np.asarray(pc.list_flatten(acl).to_pylist(), dtype=object)
        self._acl_parent = pc.list_parent_indices(acl).to_numpy(zero_copy_only=False)
        self._public = pc.list_value_length(acl).fill_null(0).to_numpy(zero_copy_only=False) == 0
        self._all_public = bool(self._public.all())
        self._acl_masks: OrderedDict[frozenset[str], np.ndarray] = OrderedDict()
        self._acl_lock = threading.Lock()  # the server searches from several threads
        self._meta_cache: dict[int, dict[str, Any]] = {}

    # ------------------------------------------------------------ public API
    def with_encoder(self, query_encoder: Callable[[list[str]], np.ndarray] | None) -> "Searcher":
        """This searcher with another query encoder, sharing its indexes and chunk columns.

        Args:
            query_encoder: the query embedding function (same dimension as the dense index).

        Returns:
            A new searcher; this one is unchanged.
        """
        other = copy.copy(self)
        other.encoder = query_encoder
        return other

    @classmethod
    def load(cls, index_dir: str | Path, chunks_path: str | Path,
             query_encoder: Callable[[list[str]], np.ndarray] | None, cfg: SearchConfig | None = None,
             mmap: bool = True) -> "Searcher":
        """Open a searcher over ``index_dir/dense`` and/or ``index_dir/bm25`` and a chunks dataset.

        Args:
            index_dir: directory holding ``dense/`` and/or ``bm25/``.
            chunks_path: the committed chunks dataset (``datasets.DatasetWriter`` output).
            query_encoder: query embedding function (needed for dense and hybrid).
            cfg: search settings.
            mmap: memory-map the index files.

        Returns:
            The searcher.

        Raises:
            FileNotFoundError: neither index exists.
        """
        index_dir = Path(index_dir)
        dense = DenseIndex.load(index_dir / "dense", mmap=mmap) if (index_dir / "dense").exists() else None
        bm25 = BM25Index.load(index_dir / "bm25", mmap=mmap) if (index_dir / "bm25").exists() else None
        if dense is None and bm25 is None:
            raise FileNotFoundError(f"{index_dir} holds neither dense/ nor bm25/")
        return cls(read_table(chunks_path), dense, bm25, query_encoder, cfg)

    def search(self, query: str, k: int = 10, mode: str = "dense", filters: dict[str, Any] | None = None,
               acl: Iterable[str] | _Unrestricted | None = None, level: str = "doc",
               fusion: str | None = None) -> list[Hit]:
        """Search one query; see `search_batch` for the arguments.

        Returns:
            Up to k hits, best first.
        """
        return self.search_batch([query], k, mode, filters, acl, level, fusion)[0]

    def search_batch(self, queries: list[str], k: int = 10, mode: str = "dense",
                     filters: dict[str, Any] | None = None, acl: Iterable[str] | _Unrestricted | None = None,
                     level: str = "doc", fusion: str | None = None,
                     query_vectors: np.ndarray | None = None) -> list[list[Hit]]:
        """Search many queries: one encoder call and one index call per candidate depth.

        Args:
            queries: query strings.
            k: hits per query.
            mode: 'dense', 'bm25' or 'hybrid'.
            filters: metadata exact-match filters (see the module docstring).
            acl: the caller's tags; None = public chunks only; UNRESTRICTED = no ACL check.
            level: 'doc' (aggregate chunks to documents by max) or 'chunk'.
            fusion: 'rrf' or 'weighted' for hybrid (default ``cfg.fusion``).
            query_vectors: precomputed query embeddings ``(len(queries), d)``; skips the encoder.

        Returns:
            One best-first hit list per query, each with up to k hits.

        Raises:
            ValueError: unknown mode / level / fusion, k < 1, or a mode whose index or encoder
                is missing.
        """
        self._check_args(mode, level, fusion or self.cfg.fusion, k, query_vectors is not None)
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings; use search() for one query")
        if not queries:
            return []
        fusion = fusion or self.cfg.fusion
        qv = None
        if mode != "bm25":
            qv = query_vectors if query_vectors is not None else self.encoder(list(queries))
            qv = np.ascontiguousarray(qv, dtype=np.float32)
            if qv.ndim != 2 or qv.shape[0] != len(queries):
                raise ValueError(f"query vectors have shape {qv.shape}, expected ({len(queries)}, dim)")
        visible = self._visible_mask(acl)
        restricted = visible is not None or bool(filters)
        if mode == "dense" and not restricted and (level == "chunk" or self._one_chunk_per_doc):
            # fast path: one FAISS call gives the answer; padding (-1) is dropped in _materialise
            scores, rows = self.dense.search(qv, k)
            return self._materialise(list(zip(scores, rows)))
        ranked = self._rank_all(queries, qv, k, mode, filters, visible, restricted, level, fusion)
        return self._materialise(ranked)

    # ------------------------------------------------------------- internals
    def _check_args(self, mode: str, level: str, fusion: str, k: int, have_vectors: bool) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r}; expected one of {MODES}")
        if level not in LEVELS:
            raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}")
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if mode in ("dense", "hybrid"):
            if self.dense is None:
                raise ValueError(f"mode {mode!r} needs a dense index; this searcher has none")
            if self.encoder is None and not have_vectors:
                raise ValueError(f"mode {mode!r} needs a query_encoder (or query_vectors)")
        if mode in ("bm25", "hybrid") and self.bm25 is None:
            raise ValueError(f"mode {mode!r} needs a BM25 index; this searcher has none")

    def _visible_mask(self, acl: Iterable[str] | _Unrestricted | None) -> np.ndarray | None:
        """Boolean visibility per row for a caller, or None when every row is visible."""
        if acl is UNRESTRICTED or self._all_public:
            return None
        if isinstance(acl, str):
            raise TypeError("acl must be an iterable of tags, not a single string")
        tags = frozenset(acl or ())
        with self._acl_lock:
            mask = self._acl_masks.get(tags)
            if mask is not None:
                self._acl_masks.move_to_end(tags)
                return mask
        mask = self._public.copy()
        if tags:
            mask[self._acl_parent[np.isin(self._acl_values, list(tags))]] = True
        with self._acl_lock:
            self._acl_masks[tags] = mask
            if len(self._acl_masks) > 256:  # bounded cache of caller tag sets
                self._acl_masks.popitem(last=False)
        return mask

    def _metadata(self, row: int) -> dict[str, Any]:
        meta = self._meta_cache.get(row)
        if meta is None:
            raw = self._meta[row].as_py()
            meta = self._meta_cache[row] = json.loads(raw) if raw else {}
        return meta

    def _passes_filters(self, rows: np.ndarray, filters: dict[str, Any]) -> np.ndarray:
        """Boolean mask over `rows` of chunks whose metadata matches every filter."""
        wanted = {key: (list(v) if isinstance(v, (list, tuple, set, frozenset)) else [v])
                  for key, v in filters.items()}
        keep = np.zeros(rows.size, dtype=bool)
        for j, row in enumerate(rows.tolist()):
            meta = self._metadata(row)
            keep[j] = all(key in meta and _value_matches(meta[key], vals) for key, vals in wanted.items())
        return keep

    def _initial_depth(self, k: int, mode: str, level: str, restricted: bool) -> int:
        depth = k
        if level == "doc" and not self._one_chunk_per_doc:
            depth = k * max(2, -(-self.n // self.n_docs))  # ~k docs' worth of chunks
        if restricted:
            depth *= 2
        if mode == "hybrid":
            depth = max(depth, self.cfg.candidates)
        return min(depth, self.n)

    def _retrieve(self, mode: str, queries: list[str], qv: np.ndarray | None, depth: int
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        if mode in ("dense", "hybrid"):
            out["dense"] = self.dense.search(qv, depth)
        if mode in ("bm25", "hybrid"):
            out["bm25"] = self.bm25.search(queries, depth)
        return out

    def _rank_all(self, queries, qv, k, mode, filters, visible, restricted, level, fusion
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Best-first (scores, rows) per query, growing the depth for queries short of k."""
        depth = self._initial_depth(k, mode, level, restricted)
        results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(queries)
        pending = np.arange(len(queries))
        while pending.size:
            sub_q = [queries[i] for i in pending] if mode != "dense" else queries
            got = self._retrieve(mode, sub_q, None if qv is None else qv[pending], depth)
            still = []
            for j, qi in enumerate(pending.tolist()):
                lists = {m: (s[j], r[j]) for m, (s, r) in got.items()}
                # a list shorter than asked (-1 padding) means this mode has nothing more to give
                exhausted = depth >= self.n or any(r[-1] < 0 for _, r in lists.values())
                scores, rows = self._rank_one(lists, k, filters, visible, restricted, level, fusion)
                if rows.size >= k or exhausted:
                    results[qi] = (scores, rows)
                else:
                    still.append(qi)
            pending = np.asarray(still, dtype=np.int64)
            depth = min(self.n, depth * 2)
        return results

    def _rank_one(self, lists, k, filters, visible, restricted, level, fusion):
        if not restricted and len(lists) == 1 and (level == "chunk" or self._one_chunk_per_doc):
            s, r = next(iter(lists.values()))  # fast path: plain top-k, nothing to filter or merge
            if r[-1] < 0 or r.size > k:
                keep = r[:k] >= 0
                s, r = s[:k][keep], r[:k][keep]
            return s, r
        clean = {}
        for m, (s, r) in lists.items():
            keep = r >= 0
            if visible is not None:
                keep &= visible[np.where(keep, r, 0)]
            s, r = s[keep], r[keep]
            if filters:
                ok = self._passes_filters(r, filters)
                s, r = s[ok], r[ok]
            clean[m] = (s, r)
        if len(clean) == 1:
            scores, rows = next(iter(clean.values()))
        elif fusion == "rrf":
            scores, rows = rrf_fuse([clean["dense"][1], clean["bm25"][1]], self.cfg.rrf_k)
        else:
            w = self.cfg.dense_weight
            scores, rows = weighted_fuse([clean["dense"][0], clean["bm25"][0]],
                                         [clean["dense"][1], clean["bm25"][1]], [w, 1.0 - w])
        if level == "doc" and not self._one_chunk_per_doc:
            # best-first list: a document's first occurrence is its max-scoring chunk
            _, first = np.unique(self._doc_code[rows], return_index=True)
            first.sort()
            scores, rows = scores[first], rows[first]
        return scores[:k], rows[:k]

    def _materialise(self, ranked: list[tuple[np.ndarray, np.ndarray]]) -> list[list[Hit]]:
        """Turn per-query (scores, rows) into Hits with one Arrow `take` per column."""
        if any(r.size and r[-1] < 0 for _, r in ranked):  # drop -1 padding (fewer than k results)
            ranked = [(s[r >= 0], r[r >= 0]) for s, r in ranked]
        sizes = [r.size for _, r in ranked]
        if sum(sizes) == 0:
            return [[] for _ in ranked]
        rows = (ranked[0][1] if len(ranked) == 1 else np.concatenate([r for _, r in ranked])).astype(np.int64,
                                                                                                copy=False)
        chunk_ids = self._chunk_ids[rows].tolist()
        doc_ids = self._doc_names[self._doc_code[rows]].tolist()
        texts = self._texts.get(rows)
        metas = self._metas.get(rows)
        scores = (ranked[0][0] if len(ranked) == 1 else np.concatenate([s for s, _ in ranked])).tolist()
        out, pos = [], 0
        for size in sizes:
            out.append([Hit(doc_ids[i], chunk_ids[i], scores[i], texts[i], metas[i], i - pos + 1)
                        for i in range(pos, pos + size)])
            pos += size
        return out


def _value_matches(have: Any, wanted: list[Any]) -> bool:
    """Exact match of a metadata value against any wanted value (list metadata: any element)."""
    if isinstance(have, list):
        return any(w in have for w in wanted)
    return have in wanted
