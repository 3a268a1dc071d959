"""Offline retrieval evaluation on BEIR-style qrels, with trec_eval semantics, in numpy.

Inputs follow the BEIR / pytrec_eval conventions:

* ``qrels``: ``{query_id: {doc_id: relevance}}`` with integer (graded) relevance;
* ``run``: ``{query_id: {doc_id: score}}``, higher scores rank first.

The figures equal trec_eval's (checked against ``pytrec_eval`` in the tests):

* a ranking is the run sorted by score descending, ties broken by doc id descending (trec_eval
  re-sorts every run this way, whatever order the retriever returned);
* a document is *relevant* for recall, MAP, MRR and precision when its qrel is >= 1; nDCG uses
  the graded value as the gain (negative grades count as 0) and builds the ideal ranking from
  the qrels, cut at the same depth;
* every query of the qrels is evaluated: a query the run does not answer scores 0 and counts in
  the mean (``trec_eval -c``); run queries absent from the qrels are ignored (BEIR convention).
  A query whose qrels hold no relevant document scores 0 on every metric, as in trec_eval; the
  per-query table's ``n_relevant`` column shows such queries.

Metric names are ``family@k`` (``ndcg@10``, ``recall@100``, ``mrr@10``, ``precision@10``,
``map@100``) or a bare family for the full run depth (``map``, ``mrr``, ``ndcg``). Their
trec_eval equivalents are given by :func:`trec_eval_measure`.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]
Hit = tuple[str, float]

DEFAULT_METRICS: tuple[str, ...] = ("ndcg@10", "recall@100", "mrr@10", "map", "recall@10", "ndcg@100")

# Families that need a cutoff (trec_eval has no uncut recall or precision measure).
_FAMILIES = {"ndcg": False, "recall": True, "precision": True, "mrr": False, "map": False}
_ALIASES = {"p": "precision", "rr": "mrr", "recip_rank": "mrr"}
_METRIC_RE = re.compile(r"^([a-z_]+)(?:@(\d+))?$")


@dataclass(frozen=True)
class Metric:
    """A parsed metric name.

    Attributes:
        name: the canonical name, e.g. ``ndcg@10`` or ``map``.
        family: ``ndcg``, ``recall``, ``precision``, ``mrr`` or ``map``.
        k: the cutoff, or None for the whole retrieved list.
    """

    name: str
    family: str
    k: int | None


def parse_metric(name: str) -> Metric:
    """Parse a metric name such as ``ndcg@10``, ``recall@100``, ``mrr@10`` or ``map``.

    Args:
        name: ``family@k`` or a bare family; case-insensitive; ``P``/``rr`` are accepted aliases.

    Returns:
        The parsed :class:`Metric` with its canonical name.

    Raises:
        ValueError: the name is not a supported metric, or its cutoff is missing or not positive.
    """
    m = _METRIC_RE.match(name.strip().lower())
    family = _ALIASES.get(m.group(1), m.group(1)) if m else None
    if m is None or family not in _FAMILIES:
        raise ValueError(
            f"unknown metric {name!r}: expected one of {sorted(_FAMILIES)} optionally followed by @k, "
            "e.g. 'ndcg@10', 'recall@100', 'mrr@10', 'map'"
        )
    k = int(m.group(2)) if m.group(2) is not None else None
    if k is not None and k < 1:
        raise ValueError(f"metric {name!r}: the cutoff must be >= 1")
    if k is None and _FAMILIES[family]:
        raise ValueError(f"metric {name!r}: {family} needs a cutoff, e.g. '{family}@100'")
    return Metric(name=family if k is None else f"{family}@{k}", family=family, k=k)


def metric_key(name: str) -> str:
    """A metric name safe for MLflow, column names and manifests: ``ndcg@10`` -> ``ndcg_10``.

    Args:
        name: a metric name (``family@k`` or bare family).

    Returns:
        The name with ``@`` replaced by ``_``.
    """
    return name.replace("@", "_")


def trec_eval_measure(name: str) -> tuple[str, int | None]:
    """The trec_eval measure that equals one of our metrics, for cross-checking.

    Args:
        name: one of our metric names.

    Returns:
        ``(measure, run_cut)``: the trec_eval measure name and the depth to which the run must be
        cut first (only for ``mrr@k``, since trec_eval's ``recip_rank`` has no cutoff), else None.
    """
    m = parse_metric(name)
    if m.family == "ndcg":
        return ("ndcg" if m.k is None else f"ndcg_cut_{m.k}"), None
    if m.family == "recall":
        return f"recall_{m.k}", None
    if m.family == "precision":
        return f"P_{m.k}", None
    if m.family == "map":
        return ("map" if m.k is None else f"map_cut_{m.k}"), None
    return "recip_rank", m.k


@dataclass
class EvalResult:
    """Per-query and mean metrics of one evaluation.

    Attributes:
        metrics: the metric names, in the order asked.
        per_query: ``{query_id: {metric: value}}`` for every query of the qrels.
        mean: ``{metric: mean over all qrels queries}``.
        n_relevant: ``{query_id: number of relevant documents in the qrels}``.
        n_retrieved: ``{query_id: number of documents the run returned}``.
    """

    metrics: tuple[str, ...]
    per_query: dict[str, dict[str, float]]
    mean: dict[str, float]
    n_relevant: dict[str, int] = field(default_factory=dict)
    n_retrieved: dict[str, int] = field(default_factory=dict)

    @property
    def num_queries(self) -> int:
        """The number of evaluated queries (every query of the qrels)."""
        return len(self.per_query)

    def flat(self, prefix: str = "") -> dict[str, float]:
        """The means keyed by MLflow-safe names, e.g. ``{"test.bm25.ndcg_10": 0.66}``.

        Args:
            prefix: prepended verbatim to each key (include the trailing dot).

        Returns:
            A new dict of mean values.
        """
        return {f"{prefix}{metric_key(m)}": v for m, v in self.mean.items()}

    def to_table(self) -> pa.Table:
        """Per-query rows: ``query_id``, ``n_relevant``, ``n_retrieved`` and one float column per metric.

        Returns:
            A pyarrow Table with one row per evaluated query.
        """
        qids = list(self.per_query)
        columns: dict[str, pa.Array] = {
            "query_id": pa.array(qids, pa.string()),
            "n_relevant": pa.array([self.n_relevant.get(q, 0) for q in qids], pa.int32()),
            "n_retrieved": pa.array([self.n_retrieved.get(q, 0) for q in qids], pa.int32()),
        }
        for m in self.metrics:
            columns[m] = pa.array([self.per_query[q][m] for q in qids], pa.float64())
        return pa.table(columns)


def rank_documents(scores: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Order one query's retrieved documents as trec_eval does.

    Args:
        scores: ``{doc_id: score}``.

    Returns:
        ``(doc_ids, scores)`` arrays sorted by score descending, then doc id descending.

    Raises:
        ValueError: a score is NaN (NaN has no place in an order).
    """
    ids = np.array(list(scores.keys()), dtype=str)
    vals = np.fromiter((float(v) for v in scores.values()), dtype=np.float64, count=len(scores))
    if np.isnan(vals).any():
        bad = ids[np.isnan(vals)][:5].tolist()
        raise ValueError(f"run scores must not be NaN (documents {bad})")
    # lexsort's last key is primary; ascending (score, id) reversed is (score desc, id desc).
    order = np.lexsort((ids, vals))[::-1]
    return ids[order], vals[order]


def _check_grade(qid: str, doc_id: str, rel: Any) -> int:
    """Qrels grades are integers, as in trec_eval; a fractional grade is an input error."""
    try:
        as_int = int(rel)
    except (TypeError, ValueError):
        raise ValueError(f"qrels[{qid!r}][{doc_id!r}] = {rel!r}: relevance must be an integer") from None
    if as_int != rel:
        raise ValueError(f"qrels[{qid!r}][{doc_id!r}] = {rel!r}: relevance must be an integer")
    return as_int


def _needed_depth(parsed: Sequence[Metric], run: Run, qids: Sequence[str]) -> int:
    """How many ranks to materialise: the largest cutoff, or the whole run for uncut metrics."""
    longest = max((len(run.get(q, ())) for q in qids), default=0)
    if any(m.k is None for m in parsed):
        return longest
    return min(longest, max(m.k for m in parsed))


def _ideal_width(parsed: Sequence[Metric], max_rel: int) -> int:
    """How many ideal gains nDCG needs: its largest cutoff, or every relevant doc for uncut nDCG."""
    ndcg = [m for m in parsed if m.family == "ndcg"]
    if not ndcg:
        return 0
    if any(m.k is None for m in ndcg):
        return max_rel
    return min(max_rel, max(m.k for m in ndcg))


def _build_matrices(
    run: Run, qrels: Mapping[str, Mapping[str, int]], qids: Sequence[str], depth: int, ideal_width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gains of the ranked lists, ideal gains, and per-query counts, padded into dense arrays."""
    n = len(qids)
    gains = np.zeros((n, depth), dtype=np.float64)
    ideal = np.zeros((n, ideal_width), dtype=np.float64)
    n_rel = np.zeros(n, dtype=np.int64)
    n_ret = np.zeros(n, dtype=np.int64)
    for i, qid in enumerate(qids):
        judged = qrels[qid]
        positive = sorted((g for g in judged.values() if g > 0), reverse=True)
        n_rel[i] = len(positive)
        if ideal_width:
            top = positive[:ideal_width]
            ideal[i, : len(top)] = top
        docs = run.get(qid) or {}
        n_ret[i] = len(docs)
        if docs and depth:
            ids, _ = rank_documents(docs)
            ids = ids[:depth]
            gains[i, : len(ids)] = [judged.get(d, 0) for d in ids.tolist()]
    return gains, ideal, n_rel, n_ret


def _compute(metric: Metric, gains: np.ndarray, ideal: np.ndarray, n_rel: np.ndarray) -> np.ndarray:
    """One metric for every query at once over the padded gain matrix."""
    depth = gains.shape[1]
    k = depth if metric.k is None else min(metric.k, depth)
    g = gains[:, :k]
    relevant = (g >= 1).astype(np.float64)  # trec_eval's relevance_level = 1
    safe_rel = np.maximum(n_rel, 1)  # numerators are 0 where n_rel == 0
    if metric.family == "ndcg":
        disc = 1.0 / np.log2(np.arange(2, max(k, ideal.shape[1]) + 2, dtype=np.float64))
        dcg = (np.clip(g, 0, None) * disc[:k]).sum(axis=1)
        ik = ideal.shape[1] if metric.k is None else min(metric.k, ideal.shape[1])
        idcg = (ideal[:, :ik] * disc[:ik]).sum(axis=1)
        return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)
    if metric.family == "recall":
        return relevant.sum(axis=1) / safe_rel
    if metric.family == "precision":
        return relevant.sum(axis=1) / metric.k  # trec_eval divides by k even for short runs
    if metric.family == "mrr":
        hit = relevant.any(axis=1)
        first = relevant.argmax(axis=1) if k else np.zeros(len(g), dtype=np.int64)
        return np.where(hit, 1.0 / (first + 1.0), 0.0)
    # map: mean of precision at each relevant rank, over all relevant docs (not only retrieved).
    ranks = np.arange(1, k + 1, dtype=np.float64)
    precision_at = np.cumsum(relevant, axis=1) / ranks
    return (precision_at * relevant).sum(axis=1) / safe_rel


def evaluate(run: Run, qrels: Qrels, metrics: Iterable[str] = DEFAULT_METRICS) -> EvalResult:
    """Score a run against qrels with trec_eval semantics (see the module docstring).

    Args:
        run: ``{query_id: {doc_id: score}}``; queries absent from the qrels are ignored.
        qrels: ``{query_id: {doc_id: grade}}`` with integer grades; every query here is evaluated.
        metrics: metric names, e.g. ``("ndcg@10", "recall@100", "mrr@10", "map")``.

    Returns:
        An :class:`EvalResult` with per-query values and means over all qrels queries.

    Raises:
        ValueError: no qrels, an unknown metric, a non-integer grade or a NaN score.
    """
    parsed = [parse_metric(m) for m in metrics]
    if not parsed:
        raise ValueError("no metrics asked")
    names = tuple(dict.fromkeys(m.name for m in parsed))
    parsed = [parse_metric(n) for n in names]
    qids = list(qrels)
    if not qids:
        raise ValueError("qrels are empty: there is no query to evaluate")
    graded = {q: {d: _check_grade(q, d, r) for d, r in qrels[q].items()} for q in qids}
    max_rel = max(sum(1 for r in graded[q].values() if r > 0) for q in qids)
    depth = _needed_depth(parsed, run, qids)
    gains, ideal, n_rel, n_ret = _build_matrices(run, graded, qids, depth, _ideal_width(parsed, max_rel))
    values = np.column_stack([_compute(m, gains, ideal, n_rel) for m in parsed])
    per_query = {q: dict(zip(names, map(float, row), strict=True)) for q, row in zip(qids, values, strict=True)}
    mean = {n: float(v) for n, v in zip(names, values.mean(axis=0), strict=True)}
    return EvalResult(
        metrics=names,
        per_query=per_query,
        mean=mean,
        n_relevant=dict(zip(qids, n_rel.tolist(), strict=True)),
        n_retrieved=dict(zip(qids, n_ret.tolist(), strict=True)),
    )


def run_from_hits(qids: Sequence[str], hits_lists: Sequence[Sequence[Hit]]) -> dict[str, dict[str, float]]:
    """Build a run from a searcher's ranked hit lists.

    Args:
        qids: the query ids, one per hit list.
        hits_lists: for each query, ``(doc_id, score)`` pairs. A document listed twice (several
            chunks of one document) keeps its best score.

    Returns:
        ``{query_id: {doc_id: score}}``.

    Raises:
        ValueError: the two sequences differ in length, or a query id repeats.
    """
    if len(qids) != len(hits_lists):
        raise ValueError(f"run_from_hits: {len(qids)} query ids but {len(hits_lists)} hit lists")
    run: dict[str, dict[str, float]] = {}
    for qid, hits in zip(qids, hits_lists, strict=True):
        if qid in run:
            raise ValueError(f"run_from_hits: query id {qid!r} appears twice")
        docs: dict[str, float] = {}
        for doc_id, score in hits:
            score = float(score)
            if doc_id not in docs or score > docs[doc_id]:
                docs[doc_id] = score
        run[qid] = docs
    return run


@dataclass(frozen=True)
class LatencyStats:
    """Query latency and throughput of one evaluation pass.

    With ``batch_size > 1`` a query's latency is its batch's wall time divided by the batch size
    (amortised); use ``batch_size=1`` for true per-query latency.

    Attributes:
        n_queries: queries timed.
        batch_size: queries per searcher call.
        total_s: wall time of all timed searcher calls.
        qps: queries per second over the timed calls.
        latency_ms_p50: median per-query latency in milliseconds.
        latency_ms_p95: 95th percentile.
        latency_ms_p99: 99th percentile.
        latency_ms_mean: mean.
    """

    n_queries: int
    batch_size: int
    total_s: float
    qps: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    latency_ms_mean: float

    def as_dict(self) -> dict[str, float]:
        """The fields as a plain dict (for metrics logging and manifests)."""
        return {k: float(v) for k, v in self.__dict__.items()}


def latency_stats(per_query_ms: Sequence[float], batch_size: int, total_s: float) -> LatencyStats:
    """Summarise per-query latencies.

    Args:
        per_query_ms: one latency per query, in milliseconds.
        batch_size: queries per searcher call, recorded as is.
        total_s: the wall time the latencies add up to.

    Returns:
        The :class:`LatencyStats`; all zeros when there are no queries.
    """
    if not per_query_ms:
        return LatencyStats(0, batch_size, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    a = np.asarray(per_query_ms, dtype=np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return LatencyStats(
        n_queries=len(a),
        batch_size=batch_size,
        total_s=total_s,
        qps=len(a) / total_s if total_s > 0 else float("inf"),
        latency_ms_p50=float(p50),
        latency_ms_p95=float(p95),
        latency_ms_p99=float(p99),
        latency_ms_mean=float(statistics.fmean(a)),
    )


def evaluate_searcher(
    searcher_fn: Callable[[list[str]], Sequence[Sequence[Hit]]],
    queries: Mapping[str, str],
    qrels: Qrels,
    k: int = 100,
    batch_size: int = 64,
    metrics: Iterable[str] = DEFAULT_METRICS,
    warmup_batches: int = 1,
) -> tuple[EvalResult, LatencyStats]:
    """Run a searcher over the judged queries, time it, and evaluate its results.

    Args:
        searcher_fn: maps a list of query texts to one ranked ``[(doc_id, score), ...]`` per query.
        queries: ``{query_id: text}``; must hold every query of ``qrels``.
        qrels: ``{query_id: {doc_id: grade}}``; only these queries are searched.
        k: results kept per query (longer lists are cut after trec_eval ordering is applied).
        batch_size: queries per searcher call.
        metrics: metric names passed to :func:`evaluate`.
        warmup_batches: batches searched once, untimed, before timing (lazy loads, caches).

    Returns:
        ``(EvalResult, LatencyStats)``.

    Raises:
        ValueError: a qrels query has no text, arguments are out of range, or the searcher
            returns a different number of hit lists than it was given queries.
    """
    if k < 1 or batch_size < 1 or warmup_batches < 0:
        raise ValueError(f"need k >= 1, batch_size >= 1, warmup_batches >= 0 (got {k}, {batch_size}, {warmup_batches})")
    qids = list(qrels)
    missing = [q for q in qids if q not in queries]
    if missing:
        raise ValueError(f"{len(missing)} qrels queries have no text in `queries`, e.g. {missing[:5]}")
    batches = [qids[i : i + batch_size] for i in range(0, len(qids), batch_size)]
    for batch in batches[:warmup_batches]:
        searcher_fn([queries[q] for q in batch])
    per_query_ms: list[float] = []
    run: dict[str, dict[str, float]] = {}
    total = 0.0
    for batch in batches:
        texts = [queries[q] for q in batch]
        t0 = time.perf_counter()
        hits = searcher_fn(texts)
        elapsed = time.perf_counter() - t0
        if len(hits) != len(batch):
            raise ValueError(f"searcher returned {len(hits)} hit lists for {len(batch)} queries")
        total += elapsed
        per_query_ms += [1000.0 * elapsed / len(batch)] * len(batch)
        for qid, docs in run_from_hits(batch, hits).items():
            run[qid] = _top_k(docs, k)
    return evaluate(run, qrels, metrics), latency_stats(per_query_ms, batch_size, total)


def _top_k(docs: dict[str, float], k: int) -> dict[str, float]:
    """The k best documents in trec_eval order (so the cut agrees with the evaluation's ranking)."""
    if len(docs) <= k:
        return docs
    ids, scores = rank_documents(docs)
    return dict(zip(ids[:k].tolist(), scores[:k].tolist(), strict=True))
