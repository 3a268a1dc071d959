"""notebooks/compare_runs.ipynb runs headless (nbclient) against the MLflow runs of a demo build."""

from __future__ import annotations

import os

import nbclient
import nbformat
from orchestration_runs import ROOT, dagster_build

NOTEBOOK = ROOT / "notebooks" / "compare_runs.ipynb"


def test_compare_runs_notebook_executes_on_the_demo_runs(tmp_path, monkeypatch):
    ws, _ = dagster_build()  # its evaluation asset logged test.<mode>.* metrics to <ws>/mlflow.db
    figure = tmp_path / "quality_vs_latency.png"
    # The kernel inherits the environment: the notebook's parameters read these variables.
    monkeypatch.setenv("CORPUSFORGE_SPEC", "demo")
    monkeypatch.setenv("CORPUSFORGE_WORKSPACE", str(ws))
    monkeypatch.setenv("COMPARE_RUNS_FIGURE", str(figure))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == []
    table = nb.cells[-1].outputs[0]["data"]["text/plain"]
    for mode in ("bm25", "dense", "hybrid"):
        assert mode in table
    assert "dagster" in table  # the runs came from the Dagster build's evaluation asset
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert figure.stat().st_size > 10_000
    assert os.environ["CORPUSFORGE_WORKSPACE"] == str(ws)
