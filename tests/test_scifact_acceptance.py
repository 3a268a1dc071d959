"""Issue acceptance on the reference data: raw SciFact to a published snapshot (slow, ~6 min)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from corpusforge.pipeline import Pipeline
from corpusforge.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_scifact_end_to_end_meets_quality_and_time_targets(tmp_path, scifact_dir):
    spec = load_spec(ROOT / "pipelines" / "scifact.yaml")
    started = time.perf_counter()
    results = {r.stage: r for r in Pipeline(spec, workspace=tmp_path, progress=False).run()}
    print(f"first run: {time.perf_counter() - started:.0f} s")

    assert results["extract"].summary["rows"] == 5183
    assert results["clean"].summary["quarantined"] == 0
    assert results["chunk"].summary["tokens"]["max"] <= 256
    modes = {m: v["metrics"] for m, v in results["evaluate"].summary["modes"].items()}
    assert modes["bm25"]["ndcg@10"] >= 0.66
    assert modes["dense"]["ndcg@10"] >= 0.64
    assert modes["hybrid"]["ndcg@10"] >= 0.68
    assert modes["hybrid"]["recall@100"] >= 0.94
    assert results["index"].summary["dense"]["recall_at_10"] >= 0.98
    sweep = {p["value"]: p["recall_10"] for p in results["evaluate"].summary["sweep"]}
    assert sweep[spec.index.dense.hnsw_ef_search] >= 0.98  # on the judged queries themselves

    started = time.perf_counter()
    again = Pipeline(spec, workspace=tmp_path, progress=False).run()
    assert all(r.skipped for r in again)
    print(f"unchanged rerun: {time.perf_counter() - started:.1f} s")
