"""Serving-side late-interaction reranking: a `Reranker` over search hits, and its snapshot files.

A snapshot that carries a reranker has a ``reranker/`` folder:

```
reranker/
  model/            the ColBERT model (backbone, tokenizer, linear.pt, colbert.json)
  doc_tokens.npy    float16 (total_tokens, dim): token vectors of every chunk, chunk-row order
  doc_offsets.npy   int64 (n_chunks + 1): chunk i's tokens are doc_tokens[off[i]:off[i+1]]
  chunk_ids.json    the chunk ids in row order (to map a hit to its vectors)
  reranker.json     fusion weight, depth, what it was trained from
```

With the document vectors precomputed, reranking k hits costs one query encoding plus k small
matrix products.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from corpusforge.retrieval.late_interaction import DOC_VECTOR_PRECISION, LateInteraction, fuse, maxsim_pairs

RERANKER_DIR = "reranker"


def add_reranker_to_build(build_dir: str | Path, model_dir: str | Path, chunks_path: str | Path,
                          fusion_weight: float, depth: int = 100, info: dict[str, Any] | None = None,
                          precompute: bool = True, batch_size: int = 64) -> Path:
    """Put a trained reranker and its float16 document token vectors into a snapshot build.

    Call it on the staging directory after `snapshots.build.assemble` and before the manifest is
    built, so the manifest lists (and hashes) the reranker files.

    Args:
        build_dir: the snapshot staging directory.
        model_dir: a reranker saved by `LateInteraction.save`.
        chunks_path: the chunks dataset whose rows the snapshot serves.
        fusion_weight: the reranker's weight in score fusion (tuned on dev).
        depth: how many first-stage hits it is meant to rerank.
        info: extra facts for ``reranker.json`` (model version, run id...).
        precompute: write the document token vectors (else reranking encodes hit texts).
        batch_size: documents per forward pass while precomputing.

    Returns:
        The ``reranker/`` directory.
    """
    import shutil

    from corpusforge.data import datasets

    out = Path(build_dir) / RERANKER_DIR
    out.mkdir(parents=True, exist_ok=False)
    shutil.copytree(model_dir, out / "model")
    if precompute:
        table = datasets.read_table(chunks_path, columns=["chunk_id", "text"])
        li = LateInteraction.load(model_dir)
        _, offsets = li.precompute(table.column("text").to_pylist(), batch_size=batch_size, progress=True,
                                   out_path=out / "doc_tokens.npy")
        np.save(out / "doc_offsets.npy", offsets)
        (out / "chunk_ids.json").write_text(json.dumps(table.column("chunk_id").to_pylist()))
    (out / "reranker.json").write_text(json.dumps({"fusion_weight": fusion_weight, "depth": depth,
                                                   "precomputed": precompute, **(info or {})}, indent=2))
    return out


class Reranker:
    """Re-scores first-stage hits with late interaction and fuses the two scores.

    Args:
        path: a snapshot's ``reranker/`` directory (model + optional precomputed vectors), or a
            bare reranker model directory.
        fusion_weight: overrides the stored weight (1.0 = reranker score only).
        device: 'auto', 'cpu' or 'cuda'.
    """

    def __init__(self, path: str | Path, fusion_weight: float | None = None, device: str = "auto"):
        path = Path(path)
        meta = json.loads((path / "reranker.json").read_text()) if (path / "reranker.json").exists() else {}
        self.model = LateInteraction.load(path / "model" if (path / "model").exists() else path, device=device)
        self.fusion_weight = fusion_weight if fusion_weight is not None else meta.get("fusion_weight", 1.0)
        self.depth = int(meta.get("depth", 100))
        self.meta = meta
        self._vectors = self._offsets = None
        self._row: dict[str, int] = {}
        if (path / "doc_tokens.npy").exists():
            self._vectors = np.load(path / "doc_tokens.npy", mmap_mode="r")
            self._offsets = np.load(path / "doc_offsets.npy")
            ids = json.loads((path / "chunk_ids.json").read_text())
            self._row = {c: i for i, c in enumerate(ids)}

    def _doc_tensors(self, hits: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token vectors of the hits' chunks: precomputed where known, else encoded now (as precomputed ones are)."""
        rows = [self._row.get(h.chunk_id) for h in hits]
        if self._vectors is None or any(r is None for r in rows):
            with torch.no_grad():
                return self.model.encode_documents([h.text for h in hits], precision=DOC_VECTOR_PRECISION)
        lengths = [int(self._offsets[r + 1] - self._offsets[r]) for r in rows]
        width = max(lengths)
        d = np.zeros((len(rows), width, self.model.cfg.dim), dtype=np.float32)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, (r, n) in enumerate(zip(rows, lengths, strict=True)):
            d[i, :n] = self._vectors[self._offsets[r]:self._offsets[r + 1]]
            mask[i, :n] = 1
        return torch.from_numpy(d).to(self.model.device), torch.from_numpy(mask).to(self.model.device)

    def scores(self, query: str, hits: Sequence[Any]) -> np.ndarray:
        """Raw MaxSim scores of the hits for a query.

        Args:
            query: the query text.
            hits: first-stage hits (with ``chunk_id`` and ``text``).

        Returns:
            float64 ``(len(hits),)``.
        """
        if not hits:
            return np.zeros(0)
        with torch.no_grad():
            q = self.model.encode_queries([query])[0]
            d, mask = self._doc_tensors(hits)
            return maxsim_pairs(q, d, mask).double().cpu().numpy()

    def rerank(self, query: str, hits: Sequence[Any], k: int = 10) -> list[Any]:
        """Rerank hits: fused score, best first, ranks renumbered.

        Args:
            query: the query text.
            hits: first-stage hits (e.g. `Searcher.search(..., k=100)`), best first.
            k: hits to return.

        Returns:
            Up to k hits (copies with the fused ``score`` and new ``rank``).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not hits:
            return []
        fused = fuse(np.array([h.score for h in hits], dtype=np.float64), self.scores(query, hits), self.fusion_weight)
        order = np.argsort(-fused, kind="stable")[:k]
        return [replace(hits[i], score=float(fused[i]), rank=n + 1) for n, i in enumerate(order)]


class RerankingSearcher:
    """A `Searcher` whose results are reranked: retrieve `depth` hits, rerank, return k.

    Args:
        searcher: the first-stage `search.Searcher`.
        reranker: the `Reranker`.
        depth: first-stage hits reranked per query (default: the reranker's).
    """

    def __init__(self, searcher, reranker: Reranker, depth: int | None = None):
        self.searcher, self.reranker = searcher, reranker
        self.depth = depth or reranker.depth

    def search(self, query: str, k: int = 10, **kwargs) -> list[Any]:
        """`Searcher.search` then rerank; keyword arguments pass through (mode, filters, acl...)."""
        return self.search_batch([query], k, **kwargs)[0]

    def search_batch(self, queries: list[str], k: int = 10, **kwargs) -> list[list[Any]]:
        """`Searcher.search_batch` at `depth`, then rerank each list to k.

        Returns:
            One reranked hit list per query.
        """
        first = self.searcher.search_batch(queries, k=max(k, self.depth), **kwargs)
        return [self.reranker.rerank(q, hits, k) for q, hits in zip(queries, first, strict=True)]
