"""notebooks/compare_runs.ipynb runs headless (nbclient) against the MLflow runs of demo builds."""

from __future__ import annotations

import os
import shutil

import nbclient
import nbformat
import pytest
from tests.orchestration_runs import DEMO_SPEC, ROOT, dagster_build

from corpusforge.pipeline import Pipeline
from corpusforge.spec import load_spec

# these modules share the session's demo builds (tests/orchestration_runs.py): one xdist worker
pytestmark = pytest.mark.xdist_group("demo-builds")

NOTEBOOK = ROOT / "notebooks" / "compare_runs.ipynb"


def test_compare_runs_notebook_labels_the_builds_by_the_params_that_differ(tmp_path, monkeypatch):
    ws, _ = dagster_build()  # its build run carries test/<mode>/* metrics in <ws>/mlflow.db
    copy = tmp_path / "ws"  # a copy: the shared build stays as other tests expect it
    shutil.copytree(ws, copy)
    spec = load_spec(DEMO_SPEC)
    spec = spec.model_copy(update={"search": spec.search.model_copy(update={"rrf_k": 30})})
    redone = {r.stage for r in Pipeline(spec, workspace=copy, progress=False).run() if not r.skipped}
    assert redone == {"evaluate", "publish"}  # a second build that differs in one param

    figure = tmp_path / "quality_vs_latency.png"
    # The kernel inherits the environment: the notebook's parameters read these variables.
    monkeypatch.setenv("CORPUSFORGE_SPEC", "demo")
    monkeypatch.setenv("CORPUSFORGE_WORKSPACE", str(copy))
    monkeypatch.setenv("COMPARE_RUNS_FIGURE", str(figure))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == []
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    # two top-level runs (the Dagster build's parent and the CLI run): nested stage runs are not compared
    assert "params that differ between the 2 runs compared: ['search.rrf_k']" in printed
    table = nb.cells[-1].outputs[0]["data"]["text/plain"]
    for mode in ("bm25", "dense", "hybrid"):
        assert mode in table
    assert "search.rrf_k=30" in table or "search.rrf_k=60" in table
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert figure.stat().st_size > 10_000
    assert os.environ["CORPUSFORGE_WORKSPACE"] == str(copy)
