"""Offline evaluation of a built pipeline: every retrieval mode on the spec's judged queries.

Writes `<workspace>/<name>/eval/` atomically: `metrics.json` (mean metrics and latency per mode,
plus an efSearch/nprobe sweep of the dense index), `per_query.parquet`, and two plots. The
pipeline's MLflow run logs all of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from corpusforge.pipeline import Pipeline

SWEEP_EF = (16, 32, 64, 128, 256)
SWEEP_NPROBE = (4, 8, 16, 32, 64)


def load_searcher(pipeline: "Pipeline"):
    """The `Searcher` over a pipeline's built indexes and chunks, with its query encoder.

    Args:
        pipeline: a pipeline whose index stage has run.

    Returns:
        (searcher, encoder).
    """
    from corpusforge.encoder import Encoder
    from corpusforge.search import Searcher

    encoder = Encoder(pipeline.spec.model)
    searcher = Searcher.load(pipeline.ws.index_dir, pipeline.ws.dataset("chunks"), encoder.encode_queries,
                             pipeline.spec.search)
    return searcher, encoder


def judged_queries(spec, split: str) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """Queries and qrels of a split, cut to `evaluate.max_queries` (sorted ids) when set."""
    from corpusforge.extract import read_qrels, read_queries

    queries = read_queries(spec.source_uri)
    qrels = read_qrels(spec.source_uri, split)
    if spec.evaluate.max_queries:
        qrels = {q: qrels[q] for q in sorted(qrels)[: spec.evaluate.max_queries]}
    return queries, qrels


def evaluate_pipeline(pipeline: "Pipeline") -> dict[str, Any]:
    """Evaluate every configured mode and write the eval directory.

    Args:
        pipeline: a pipeline whose index stage has run.

    Returns:
        The stage summary: mean metrics and latency per mode, the sweep, the split and counts.
    """
    from corpusforge.datasets import atomic_dir
    from corpusforge.evaluate import evaluate_searcher

    spec = pipeline.spec
    queries, qrels = judged_queries(spec, spec.evaluate.split)
    searcher, _ = load_searcher(pipeline)
    k = spec.evaluate.k
    modes: dict[str, Any] = {}
    tables = []
    for mode in spec.evaluate.modes:
        result, latency = evaluate_searcher(_as_run_fn(searcher, mode, k), queries, qrels, k=k, batch_size=1)
        modes[mode] = {"metrics": result.mean, "latency": latency.as_dict()}
        table = result.to_table()
        tables.append(table.append_column("mode", pa.array([mode] * table.num_rows)))
    sweep = _dense_sweep(pipeline, searcher, queries, qrels) if "dense" in spec.evaluate.modes else []
    summary = {"split": spec.evaluate.split, "queries": len(qrels), "k": k, "modes": modes, "sweep": sweep}
    tower = _evaluate_query_tower(pipeline, searcher, queries, qrels, k)
    if tower:
        summary["query_tower"] = tower
        for mode, values in tower["modes"].items():
            table = values.pop("_table")
            tables.append(table.append_column("mode", pa.array([f"{mode}-tower"] * table.num_rows)))

    from corpusforge.plots import plot_quality_vs_latency, plot_recall_vs_latency_sweep

    with atomic_dir(pipeline.ws.eval_dir) as out:
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
        pq.write_table(pa.concat_tables(tables, promote_options="default"), out / "per_query.parquet")
        points = [_point(m, v) for m, v in modes.items()]
        points += [_point(f"{m}-tower", v) for m, v in (tower or {}).get("modes", {}).items()]
        plot_quality_vs_latency(points, out / "quality_vs_latency.png")
        if sweep:
            plot_recall_vs_latency_sweep(sweep, out / "recall_vs_latency.png")
    return summary


def _evaluate_query_tower(pipeline: "Pipeline", searcher, queries, qrels, k: int) -> dict[str, Any] | None:
    """The dense-using modes again with the distilled query tower encoding the queries.

    The passages keep the full encoder's vectors; only the query side changes, exactly as the
    endpoint serves a snapshot that carries a tower. None when the index has no tower.
    """
    from corpusforge.encoder import Encoder
    from corpusforge.evaluate import evaluate_searcher
    from corpusforge.query_tower import read_tower_info, tower_model_config

    tower_dir = pipeline.ws.index_dir / "query_tower"
    info = read_tower_info(tower_dir)
    if info is None:
        return None
    searcher = searcher.with_encoder(Encoder(tower_model_config(pipeline.spec.model, tower_dir)).encode_queries)
    modes = {}
    for mode in (m for m in pipeline.spec.evaluate.modes if m != "bm25"):
        result, latency = evaluate_searcher(_as_run_fn(searcher, mode, k), queries, qrels, k=k, batch_size=1)
        modes[mode] = {"metrics": result.mean, "latency": latency.as_dict(), "_table": result.to_table()}
    return {"layers": info["layers"], "teacher_layers": info.get("teacher_layers"),
            "holdout_cosine": info.get("holdout_cosine"), "modes": modes}


def _as_run_fn(searcher, mode: str, k: int):
    from corpusforge.search import UNRESTRICTED

    def run(texts: list[str]):
        return [[(h.doc_id, h.score) for h in hits]
                for hits in searcher.search_batch(texts, k=k, mode=mode, acl=UNRESTRICTED)]
    return run


def _point(mode: str, values: dict[str, Any]) -> dict[str, Any]:
    m, lat = values["metrics"], values["latency"]
    return {"mode": mode, "label": mode, "ndcg_10": m.get("ndcg@10"), "recall_100": m.get("recall@100"),
            "latency_ms_p50": lat["latency_ms_p50"]}


def _dense_sweep(pipeline: "Pipeline", searcher, queries: dict[str, str], qrels) -> list[dict[str, Any]]:
    """Recall@10 against exact search, and per-query latency, over the dense index's search knob.

    The queries are the judged queries themselves (not sampled corpus vectors), so the recall is
    what users of this index actually get; exact neighbours come from a flat scan of the stored
    embeddings.
    """
    import time

    import faiss
    import numpy as np

    from corpusforge.index.dense import recall_at_k
    from corpusforge.pipeline import load_vectors

    factory = searcher.dense.report().get("factory", "")
    if "HNSW" in factory:
        param, values = "ef_search", SWEEP_EF
    elif "IVF" in factory:
        param, values = "nprobe", SWEEP_NPROBE
    else:
        return []
    qv = np.ascontiguousarray(searcher.encoder([queries[q] for q in qrels]), dtype=np.float32)
    _, vectors = load_vectors(pipeline.ws.dataset("embeddings"))
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
