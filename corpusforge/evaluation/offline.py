"""Offline evaluation of a built pipeline: every retrieval mode on the spec's judged queries.

Writes `<workspace>/<name>/eval/` atomically: `metrics.json` (mean metrics and latency per mode,
plus an efSearch/nprobe sweep of the dense index), `per_query.parquet`, and two plots. The
pipeline's MLflow run logs all of it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from corpusforge.spec import PipelineSpec
    from corpusforge.stages import Retriever, StageContext
    from corpusforge.workspace import Workspace

SWEEP_EF = (16, 32, 64, 128, 256)
SWEEP_NPROBE = (4, 8, 16, 32, 64)
MODES = ("bm25", "dense", "hybrid")
RERANKED = ("hybrid", "dense")  # first stages the reranker is scored on


def load_searcher(spec: "PipelineSpec", ws: "Workspace", retriever: "Retriever"):
    """The `Searcher` over a retriever's indexes and the chunks, with its query encoder.

    Args:
        spec: the pipeline spec.
        ws: its workspace.
        retriever: the parts to search (`stages.retriever`).

    Returns:
        (searcher, encoder).
    """
    from corpusforge.encoding.encoder import Encoder
    from corpusforge.index.bm25 import BM25Index
    from corpusforge.index.dense import DenseIndex
    from corpusforge.retrieval.search import Searcher
    from corpusforge.data.datasets import read_table

    encoder = Encoder(retriever.model)
    searcher = Searcher(read_table(ws.dataset("chunks")), DenseIndex.load(retriever.dense_dir),
                        BM25Index.load(retriever.bm25_dir), encoder.encode_queries, spec.search)
    return searcher, encoder


def judged_queries(spec, split: str) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """Queries and qrels of a split, cut to `evaluate.max_queries` (sorted ids) when set."""
    from corpusforge.text.extract import read_qrels, read_queries

    queries = read_queries(spec.source_uri)
    qrels = read_qrels(spec.source_uri, split)
    if spec.evaluate.max_queries:
        qrels = {q: qrels[q] for q in sorted(qrels)[: spec.evaluate.max_queries]}
    return queries, qrels


def evaluate_modes(searcher, queries: dict[str, str], qrels: dict[str, dict[str, int]], k: int = 100,
                   modes=MODES, reranker=None, depth: int = 100) -> dict[str, dict[str, float]]:
    """Mean metrics per mode (and reranked modes when a reranker is given), batched.

    Args:
        searcher: a `search.Searcher`.
        queries: query id -> text.
        qrels: the judgments to evaluate against.
        k: depth of the evaluated runs.
        modes: first-stage modes.
        reranker: a `Reranker`; adds ``hybrid+rerank`` and ``dense+rerank``.
        depth: hits reranked.

    Returns:
        ``{mode: {metric: value}}``.
    """
    from corpusforge.evaluation.metrics import evaluate_searcher

    return {mode: evaluate_searcher(fn, queries, qrels, k=kk, batch_size=64)[0].mean
            for mode, (fn, kk) in _run_fns(searcher, modes, k, reranker, depth).items()}


def _run_fns(searcher, modes, k: int, reranker, depth: int) -> dict[str, tuple[Any, int]]:
    """mode -> (texts -> ranked (doc, score) lists, depth evaluated)."""
    fns = {mode: (_as_run_fn(searcher, mode, k), k) for mode in modes}
    if reranker is not None:
        from corpusforge.retrieval.rerank import RerankingSearcher

        rs = RerankingSearcher(searcher, reranker, depth)
        for mode in RERANKED:
            fns[f"{mode}+rerank"] = (_as_run_fn(rs, mode, min(k, depth)), min(k, depth))
    return fns


def ranked_docs(searcher, texts: list[str], mode: str, k: int) -> list[list[str]]:
    """The doc ids each text retrieves, best first."""
    return [[doc for doc, _ in hits] for hits in _as_run_fn(searcher, mode, k)(texts)]


def dev_split(ctx: "StageContext"):
    """The dev queries and judgments (the seeded share of the training judgments), or None.

    None when the source has no usable training split; the dev split drives model selection and
    promotion, never the test split.
    """
    from corpusforge.train.data import training_data_for

    try:
        data = training_data_for(ctx.spec, ctx.ws)
    except (FileNotFoundError, ValueError):
        return None
    return data.queries, data.dev_qrels


def evaluate(ctx: "StageContext") -> dict[str, Any]:
    """Evaluate every configured mode and write the eval directory (the evaluate stage).

    The report split (``evaluate.split``) gets every metric, per-query latency, the dense sweep and
    the plots; the dev split gets mean metrics per mode, which publish compares when promotion is
    gated. With a trained reranker the reranked modes are scored too.

    Args:
        ctx: the stage context (index stages done).

    Returns:
        The stage summary: mean metrics and latency per mode, the sweep, the split and counts, and
        ``dev`` (queries and metrics per mode) when the source has a training split.
    """
    from corpusforge.data.datasets import atomic_dir
    from corpusforge.evaluation.metrics import evaluate_searcher
    from corpusforge.stages import retriever

    spec, ws = ctx.spec, ctx.ws
    r = retriever(spec, ws)
    queries, qrels = judged_queries(spec, spec.evaluate.split)
    searcher, _ = load_searcher(spec, ws, r)
    reranker = None
    if r.reranker_dir is not None:
        from corpusforge.retrieval.rerank import Reranker

        reranker = Reranker(r.reranker_dir)
    k, depth = spec.evaluate.k, spec.train.reranker.depth
    modes: dict[str, Any] = {}
    tables = []
    for mode, (fn, kk) in _run_fns(searcher, spec.evaluate.modes, k, reranker, depth).items():
        result, latency = evaluate_searcher(fn, queries, qrels, k=kk, batch_size=1)
        modes[mode] = {"metrics": result.mean, "latency": latency.as_dict()}
        table = result.to_table()
        tables.append(table.append_column("mode", pa.array([mode] * table.num_rows)))
    sweep = _dense_sweep(r, searcher, queries, qrels) if "dense" in spec.evaluate.modes else []
    summary = {"split": spec.evaluate.split, "queries": len(qrels), "k": k, "modes": modes, "sweep": sweep,
               "trained": r.trained}
    dev = dev_split(ctx)
    if dev is not None:
        dev_modes = evaluate_modes(searcher, dev[0], dev[1], k=k, modes=spec.evaluate.modes, reranker=reranker,
                                   depth=depth)
        summary["dev"] = {"queries": len(dev[1]), "modes": dev_modes}
    tower = _evaluate_query_tower(spec, r, searcher, queries, qrels, k)
    if tower:
        summary["query_tower"] = tower
        for mode, values in tower["modes"].items():
            table = values.pop("_table")
            tables.append(table.append_column("mode", pa.array([f"{mode}-tower"] * table.num_rows)))

    from corpusforge.evaluation.plots import plot_quality_vs_latency, plot_recall_vs_latency_sweep

    with atomic_dir(ws.eval_dir) as out:
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
        pq.write_table(pa.concat_tables(tables, promote_options="default"), out / "per_query.parquet")
        points = [_point(m, v) for m, v in modes.items()]
        points += [_point(f"{m}-tower", v) for m, v in (tower or {}).get("modes", {}).items()]
        plot_quality_vs_latency(points, out / "quality_vs_latency.png")
        if sweep:
            plot_recall_vs_latency_sweep(sweep, out / "recall_vs_latency.png")
    return summary


def _evaluate_query_tower(spec, retriever, searcher, queries, qrels, k: int) -> dict[str, Any] | None:
    """The dense-using modes again with the distilled query tower encoding the queries.

    The passages keep the full encoder's vectors; only the query side changes, exactly as the
    endpoint serves a snapshot that carries a tower. None when the index has no tower.
    """
    from corpusforge.encoding.encoder import Encoder
    from corpusforge.evaluation.metrics import evaluate_searcher
    from corpusforge.encoding.query_tower import read_tower_info, tower_model_config

    tower_dir = retriever.tower_dir
    info = read_tower_info(tower_dir) if tower_dir is not None else None
    if info is None:
        return None
    searcher = searcher.with_encoder(Encoder(tower_model_config(spec.model, tower_dir)).encode_queries)
    modes = {}
    for mode in (m for m in spec.evaluate.modes if m != "bm25"):
        result, latency = evaluate_searcher(_as_run_fn(searcher, mode, k), queries, qrels, k=k, batch_size=1)
        modes[mode] = {"metrics": result.mean, "latency": latency.as_dict(), "_table": result.to_table()}
    return {"layers": info["layers"], "teacher_layers": info.get("teacher_layers"),
            "holdout_cosine": info.get("holdout_cosine"), "modes": modes}


def _as_run_fn(searcher, mode: str, k: int):
    from corpusforge.retrieval.search import UNRESTRICTED

    def run(texts: list[str]):
        return [[(h.doc_id, h.score) for h in hits]
                for hits in searcher.search_batch(texts, k=k, mode=mode, acl=UNRESTRICTED)]
    return run


def _point(mode: str, values: dict[str, Any]) -> dict[str, Any]:
    m, lat = values["metrics"], values["latency"]
    return {"mode": mode, "label": mode, "ndcg_10": m.get("ndcg@10"), "recall_100": m.get("recall@100"),
            "latency_ms_p50": lat["latency_ms_p50"]}


def _dense_sweep(retriever, searcher, queries: dict[str, str], qrels) -> list[dict[str, Any]]:
    """Recall@10 against exact search, and per-query latency, over the dense index's search knob.

    The queries are the judged queries themselves (not sampled corpus vectors), so the recall is
    what users of this index actually get; exact neighbours come from a flat scan of the stored
    embeddings.
    """
    import time

    import faiss
    import numpy as np

    from corpusforge.index.dense import recall_at_k
    from corpusforge.stages.model import load_vectors

    factory = searcher.dense.report().get("factory", "")
    if "HNSW" in factory:
        param, values = "ef_search", SWEEP_EF
    elif "IVF" in factory:
        param, values = "nprobe", SWEEP_NPROBE
    else:
        return []
    qv = np.ascontiguousarray(searcher.encoder([queries[q] for q in qrels]), dtype=np.float32)
    _, vectors = load_vectors(retriever.embeddings)
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(qv, 10)
    points = []
    for value in values:
        found, times = [], []
        for row in qv:
            t0 = time.perf_counter()
            _, rows = searcher.dense.search(row[None, :], 10, **{param: value})
            times.append(1000 * (time.perf_counter() - t0))
            found.append(rows[0])
        points.append({"param": param, "value": value, "recall_10": recall_at_k(np.stack(found), truth),
                       "latency_ms": float(np.median(times))})
    return points
