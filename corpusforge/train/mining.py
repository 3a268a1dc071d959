"""Hard-negative mining from BM25 and the current dense index, with a margin filter.

For every training query the miner takes the top ``depth`` documents of BM25 and of the dense
index (chunk hits aggregated to documents by their best chunk), drops every document judged
relevant for the query, and drops likely false negatives: candidates whose dense similarity to
the query is above ``margin`` x the positive's similarity (the positive-aware filter of
NV-Retriever; one similarity scale for candidates from both sources, so the filter means the same
for BM25 and dense candidates). The survivors are interleaved by rank (BM25 #1, dense #1, BM25
#2, ...) without repeats and the first ``n`` are kept.

The result is a Parquet dataset (``MINED``), one row per (query, negative), so a training run
can be reproduced and inspected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from corpusforge.data import datasets

MINED = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),  # bm25 | dense
    pa.field("rank", pa.int32(), nullable=False),  # 1-based rank in its source list
    pa.field("score", pa.float32(), nullable=False),  # dense similarity to the query
    pa.field("positive_score", pa.float32(), nullable=False),  # best positive's dense similarity
], metadata={"dataset": "hard_negatives"})


@dataclass(frozen=True)
class MiningConfig:
    """How many negatives, from how deep, with which false-negative margin.

    Attributes:
        n: negatives kept per query.
        depth: candidate documents taken from each source.
        margin: drop candidates whose similarity exceeds ``margin`` x the positive's (0 < m <= 1).
        skip: ignore the top ``skip`` candidates of each source (often unjudged positives).
    """

    n: int = 4
    depth: int = 30
    margin: float = 0.95
    skip: int = 0

    def __post_init__(self) -> None:
        if self.n < 0 or self.depth < 1 or self.skip < 0:
            raise ValueError(f"mining needs n >= 0, depth >= 1, skip >= 0; got {self}")
        if not 0 < self.margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {self.margin}")


def docs_from_chunk_hits(rows: np.ndarray, chunk_docs: Sequence[str], depth: int) -> list[str]:
    """Distinct documents of a best-first chunk-row list (a document ranks at its best chunk).

    Args:
        rows: chunk rows, best first (-1 entries ignored).
        chunk_docs: doc id of every chunk row.
        depth: documents wanted.

    Returns:
        Up to `depth` doc ids, best first.
    """
    out: list[str] = []
    seen: set[str] = set()
    for r in rows.tolist():
        if r < 0:
            continue
        d = chunk_docs[r]
        if d not in seen:
            seen.add(d)
            out.append(d)
            if len(out) == depth:
                break
    return out


def select_negatives(positives: set[str], ranked: dict[str, list[str]], sim: Callable[[str], float],
                     positive_score: float, cfg: MiningConfig) -> list[tuple[str, str, int, float]]:
    """Choose one query's negatives from its per-source candidate lists.

    Args:
        positives: the query's judged-relevant doc ids (never returned).
        ranked: source name -> candidate doc ids, best first.
        sim: dense similarity of the query to a doc.
        positive_score: the best positive's similarity.
        cfg: the mining settings.

    Returns:
        ``(doc_id, source, rank, score)`` of up to ``cfg.n`` negatives, interleaved by rank.
    """
    limit = cfg.margin * positive_score
    chosen: list[tuple[str, str, int, float]] = []
    seen: set[str] = set(positives)
    longest = max((len(v) for v in ranked.values()), default=0)
    for i in range(cfg.skip, longest):
        for source in sorted(ranked):
            docs = ranked[source]
            if i >= len(docs) or docs[i] in seen:
                continue
            seen.add(docs[i])
            score = sim(docs[i])
            if score > limit:  # likely an unjudged positive: training against it would hurt
                continue
            chosen.append((docs[i], source, i + 1, score))
            if len(chosen) == cfg.n:
                return chosen
    return chosen


def mine_hard_negatives(queries: dict[str, str], qrels: dict[str, dict[str, int]], chunk_docs: Sequence[str],
                        chunk_vectors: np.ndarray, encode_queries: Callable[[list[str]], np.ndarray],
                        bm25_search: Callable[[list[str], int], tuple[np.ndarray, np.ndarray]] | None,
                        dense_search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None,
                        cfg: MiningConfig, out_path: str | Path | None = None) -> pa.Table:
    """Mine hard negatives for every query of `qrels` (pass TRAINING qrels only).

    Args:
        queries: query id -> text (must hold every qrels query).
        qrels: the training judgments, ``{qid: {doc_id: grade}}``; grade > 0 is a positive.
        chunk_docs: doc id of every chunk row of the index.
        chunk_vectors: the current dense vectors of every chunk row ``(n, d)``, L2-normalised.
        encode_queries: texts -> query vectors from the current encoder.
        bm25_search: ``(texts, k) -> (scores, rows)`` over chunk rows, or None to skip BM25.
        dense_search: ``(vectors, k) -> (scores, rows)`` over chunk rows, or None to skip dense.
        cfg: the mining settings.
        out_path: when given, the Parquet dataset to write (committed atomically).

    Returns:
        The negatives as a ``MINED`` table, sorted by query id then source order.

    Raises:
        ValueError: no candidate source, or a qrels query without text.
    """
    if bm25_search is None and dense_search is None:
        raise ValueError("hard-negative mining needs BM25 and/or a dense index")
    qids = sorted(q for q, docs in qrels.items() if any(g > 0 for g in docs.values()))
    missing = [q for q in qids if q not in queries]
    if missing:
        raise ValueError(f"{len(missing)} training queries have no text, e.g. {missing[:3]}")
    texts = [queries[q] for q in qids]
    qv = np.ascontiguousarray(encode_queries(texts), dtype=np.float32)
    chunk_k = cfg.depth * 4 + cfg.skip * 4  # chunk depth covering `depth` distinct documents
    lists: dict[str, np.ndarray] = {}
    if bm25_search is not None and texts:
        lists["bm25"] = bm25_search(texts, chunk_k)[1]
    if dense_search is not None and texts:
        lists["dense"] = dense_search(qv, chunk_k)[1]
    rows_of: dict[str, list[int]] = {}
    for row, d in enumerate(chunk_docs):
        rows_of.setdefault(d, []).append(row)
    cols: dict[str, list] = {name: [] for name in MINED.names}
    for i, qid in enumerate(qids):
        positives = {d for d, g in qrels[qid].items() if g > 0}

        def sim(doc: str, i: int = i) -> float:  # a document's similarity is its best chunk's
            return float((chunk_vectors[rows_of[doc]] @ qv[i]).max())

        pos_scores = [sim(d) for d in positives if d in rows_of]
        if not pos_scores:
            continue
        ranked = {s: docs_from_chunk_hits(r[i], chunk_docs, cfg.depth + cfg.skip) for s, r in lists.items()}
        for doc, source, rank, score in select_negatives(positives, ranked, sim, max(pos_scores), cfg):
            for name, value in zip(MINED.names, (qid, doc, source, rank, score, max(pos_scores)), strict=True):
                cols[name].append(value)
    table = pa.table(cols, schema=MINED)
    if out_path is not None:
        with datasets.DatasetWriter(Path(out_path), MINED) as writer:
            writer.write_table(table)
            writer.commit({"stage": "mine", "n": str(cfg.n), "depth": str(cfg.depth), "margin": str(cfg.margin)})
    return table


def negatives_by_query(table: pa.Table) -> dict[str, list[str]]:
    """Group a mined table into query id -> negative doc ids in mined order.

    Args:
        table: a ``MINED`` table.

    Returns:
        The mapping.
    """
    out: dict[str, list[str]] = {}
    for q, d in zip(table.column("query_id").to_pylist(), table.column("doc_id").to_pylist(), strict=True):
        out.setdefault(q, []).append(d)
    return out
