"""What the Dagster and Airflow shells share, in the core: spec discovery, environment overrides, flat stage summaries."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from corpusforge.pipeline import Pipeline, StageResult
from corpusforge.spec import Overrides, SpecError, apply_overrides, check_unique_names, discover_specs, load_spec

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "pipelines" / "demo.yaml"


def test_discover_specs_lists_yaml_stems_and_rejects_a_missing_folder(tmp_path):
    found = discover_specs(ROOT / "pipelines")
    assert found["demo"] == DEMO.resolve() and list(found) == sorted(found)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_specs(tmp_path / "nope")


def test_spec_names_are_unique_in_a_folder(tmp_path):
    assert set(check_unique_names(ROOT / "pipelines")) >= {"demo", "demo-train", "scifact", "scifact-train"}
    for stem in ("a", "b"):
        (tmp_path / f"{stem}.yaml").write_text(DEMO.read_text().replace("../examples/demo", str(ROOT / "examples" / "demo")))
    with pytest.raises(SpecError, match=r"b.yaml: invalid pipeline spec\n  - name: 'demo' is also the name of a.yaml"):
        check_unique_names(tmp_path)


def test_overrides_from_env_and_applied_to_a_spec(tmp_path):
    overrides = Overrides.from_env({"CORPUSFORGE_DEVICE": "cpu", "CORPUSFORGE_PUBLISH_ROOT": "s3://b/snaps",
                                    "CORPUSFORGE_MLFLOW_EXPERIMENT": "", "UNRELATED": "x"})
    assert overrides == Overrides(device="cpu", publish_root="s3://b/snaps")
    spec = apply_overrides(load_spec(DEMO), overrides)
    assert (spec.model.device, spec.publish.root) == ("cpu", "s3://b/snaps")
    assert spec.source_uri == load_spec(DEMO).source_uri  # relative paths still resolve from the spec's folder
    assert spec.tracking.experiment == "demo"  # empty variables keep the spec's value
    pipeline = Pipeline.open(DEMO, tmp_path, Overrides())
    assert pipeline.ws.root == tmp_path.resolve() and pipeline.progress is False
    assert pipeline.fingerprint("chunk") == Pipeline.open(DEMO, tmp_path / "other").fingerprint("chunk")


def test_a_bad_override_is_an_error_naming_the_field():
    with pytest.raises(pydantic.ValidationError, match="device"):
        apply_overrides(load_spec(DEMO), Overrides(device="tpu"))


def test_stage_metadata_flattens_counts_reasons_metrics_and_versions():
    evaluate = StageResult("evaluate", False, "f00", {
        "split": "test", "queries": 12, "sweep": [{"ef_search": 16}],
        "modes": {"dense": {"metrics": {"ndcg@10": 0.9}, "latency": {"latency_ms_p50": 3.5}}},
        "dev": {"queries": 2, "modes": {"dense": {"ndcg@10": 0.8}}}}, 1.23456, peak_rss_mb=512.04)
    # one spelling per metric, MLflow-safe: <split>/<mode>/<metric>, the same in MLflow (StageResult.metrics)
    assert evaluate.flat() == {"stage": "evaluate", "skipped": False, "fingerprint": "f00", "seconds": 1.235,
                               "peak_rss_mb": 512.0, "split": "test", "queries": 12, "test/dense/ndcg_10": 0.9,
                               "test/dense/latency_ms_p50": 3.5, "dev/dense/ndcg_10": 0.8}
    assert evaluate.metrics() == {"seconds": 1.235, "peak_rss_mb": 512.0, "queries": 12.0, "test/dense/ndcg_10": 0.9,
                                  "test/dense/latency_ms_p50": 3.5, "dev/dense/ndcg_10": 0.8}
    clean = StageResult("clean", True, "f01", {"rows": 3, "quarantined": 2,
                                               "quarantine_reasons": {"empty_text": 1, "near_duplicate": 1}})
    meta = clean.flat()
    assert meta["skipped"] is True and meta["rows"] == 3 and meta["quarantine/near_duplicate"] == 1
    publish = StageResult("publish", False, "f02", {"version": "v1", "alias": "production", "files": 12})
    assert {k: publish.flat()[k] for k in ("version", "alias", "files")} == {
        "version": "v1", "alias": "production", "files": 12}
