"""The stage runner end to end through the real CLI: bad input, strict mode, skips, and kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corpusforge.data import datasets
from corpusforge.pipeline import Pipeline
from corpusforge.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "corpusforge.cli"]


def cli(*args, cwd=ROOT, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def _good(i: int, text: str | None = None) -> dict:
    return {"_id": f"good-{i}", "title": f"Title {i}",
            "text": text or f"Document number {i} talks about topic {i * 7} in plain words. " * 3}


def _write_bad_jsonl_corpus(root: Path) -> tuple[set[str], dict[str, int]]:
    """A corpus mixing good records with every line-level fault; returns good ids and expected reasons."""
    root.mkdir(parents=True)
    lines: list[bytes] = []
    good = set()
    for i in range(6):
        lines.append(json.dumps(_good(i)).encode())
        good.add(f"good-{i}")
    lines.append(b'{"_id": "broken", "title": "x", "text": "unterminated')           # malformed json
    lines.append(json.dumps({"title": "no id", "text": "a record without an id"}).encode())
    lines.append(json.dumps({**_good(0), "text": "the same id with different text"}).encode())
    lines.append(json.dumps({"_id": "empty", "title": "t", "text": ""}).encode())       # empty text
    lines.append(b'{"_id": "badutf8", "title": "t", "text": "caf\xe9 \xff\xfe bytes"}')  # invalid utf-8
    lines.append(json.dumps({"_id": "huge", "title": "big", "text": "word " * 1_000_000}).encode())  # 5 MB
    (root / "corpus.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    expected = {"malformed_json": 1, "missing_id": 1, "duplicate_id": 1, "invalid_utf8": 1,
                "empty_text": 1, "too_long": 1}
    return good, expected


def _spec(tmp_path: Path, source: str, extra: str = "") -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(f"name: bad\nsource: {source}\nchunk: {{max_tokens: 64, overlap_tokens: 8}}\n{extra}")
    return path


def _quarantine(ws: Path, name: str) -> list[dict]:
    rows = []
    for stage in ("extract", "clean", "chunk"):
        path = ws / name / "quarantine" / stage
        if datasets.is_complete(path):
            rows += list(datasets.iter_rows(path))
    return rows


def test_bad_jsonl_corpus_completes_with_everything_accounted_for(tmp_path):
    good, expected = _write_bad_jsonl_corpus(tmp_path / "corpus")
    spec = _spec(tmp_path, "{format: jsonl, path: corpus/corpus.jsonl}")
    ws = tmp_path / "ws"
    out = cli("run", spec, "--until", "chunk", "--workspace", ws)
    assert out.returncode == 0, out.stderr[-3000:]

    docs = {r["doc_id"]: r for r in datasets.iter_rows(ws / "bad" / "documents_clean")}
    assert set(docs) == good
    assert docs["good-0"]["text"].startswith("Document number 0")  # the first of a duplicate id wins
    quarantined = _quarantine(ws, "bad")
    reasons: dict[str, int] = {}
    for row in quarantined:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
        assert row["detail"] and row["record"] is not None
    assert reasons == expected
    huge = next(r for r in quarantined if r["reason"] == "too_long")
    assert len(json.loads(huge["record"])["text"]) == 5_000_000  # the record is kept whole
    chunk_docs = {r["doc_id"] for r in datasets.iter_rows(ws / "bad" / "chunks")}
    assert chunk_docs == good

    state = {s: json.loads((ws / "bad" / "state" / f"{s}.json").read_text())["summary"]
             for s in ("extract", "clean")}
    assert state["extract"]["quarantined"] + state["clean"]["quarantined"] == sum(expected.values())
    assert state["clean"]["rows"] == len(good)
    assert "too_long" in out.stderr and "malformed_json" in out.stderr  # the summary names reasons


def test_strict_mode_turns_quarantine_into_failure(tmp_path):
    _write_bad_jsonl_corpus(tmp_path / "corpus")
    spec = _spec(tmp_path, "{format: jsonl, path: corpus/corpus.jsonl}")
    out = cli("run", spec, "--until", "clean", "--workspace", tmp_path / "ws", "--strict")
    assert out.returncode == 4
    assert "quarantined (strict mode)" in out.stderr


def test_unreadable_pdf_in_a_directory_corpus(tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.txt").write_text("Alpha notes\n\nThe alpha document is about glaciers and ice.")
    (src / "b.md").write_text("# Beta\n\nBeta covers volcanoes and magma in some detail.")
    (src / "broken.pdf").write_bytes(b"%PDF-1.4\n this is not really a pdf \x00\x01")
    spec = _spec(tmp_path, "{format: dir, path: docs}")
    ws = tmp_path / "ws"
    out = cli("run", spec, "--until", "chunk", "--workspace", ws)
    assert out.returncode == 0, out.stderr[-3000:]
    ids = {r["doc_id"] for r in datasets.iter_rows(ws / "bad" / "documents_clean")}
    assert ids == {"a.txt", "b.md"}
    (bad,) = _quarantine(ws, "bad")
    assert (bad["reason"], bad["stage"]) == ("unreadable_file", "extract")
    assert bad["source"].endswith("broken.pdf")


def test_second_run_skips_and_a_config_change_reruns_only_downstream(tmp_path):
    spec = load_spec(ROOT / "pipelines" / "demo.yaml")
    first = Pipeline(spec, workspace=tmp_path, progress=False)
    results = {r.stage: r for r in first.run(until="chunk")}
    assert not any(r.skipped for r in results.values())
    assert results["extract"].summary["rows"] == 41 and results["chunk"].summary["rows"] > 41

    again = {r.stage: r for r in Pipeline(spec, workspace=tmp_path, progress=False).run(until="chunk")}
    assert all(r.skipped for r in again.values())
    assert again["chunk"].summary == results["chunk"].summary

    changed = spec.model_copy(update={"chunk": spec.chunk.model_copy(update={"max_tokens": 48})})
    rerun = {r.stage: r for r in Pipeline(changed, workspace=tmp_path, progress=False).run(until="chunk")}
    assert rerun["extract"].skipped and rerun["clean"].skipped and not rerun["chunk"].skipped
    assert rerun["chunk"].summary["tokens"]["max"] <= 48


def test_each_stage_reports_its_own_peak_rss(tmp_path, monkeypatch):
    """A stage that holds 600 MB reports it; the next stage, run in the same process, does not inherit it.

    Measured against the process's own RSS, not the stage before: in a long-lived xdist worker the
    first stage's peak includes heap that `release_memory` then returns, and the chunk stage's own
    peak (tokenizer loaded) can exceed a small held block.
    """
    import mmap

    import psutil

    import corpusforge.stages.data as data_stages

    clean = data_stages.clean
    before: dict[str, float] = {}

    def clean_holding_600mb(ctx):
        before["rss_mb"] = psutil.Process().memory_info().rss / 2**20
        # an anonymous mapping of its own: new pages, whatever malloc already holds in this process
        held = mmap.mmap(-1, 600 * 2**20)
        try:
            for offset in range(0, len(held), 4096):  # touch every page: resident, not just reserved
                held[offset] = 1
            return clean(ctx)
        finally:
            held.close()

    monkeypatch.setattr(data_stages, "clean", clean_holding_600mb)
    pipeline = Pipeline(load_spec(ROOT / "pipelines" / "demo.yaml"), workspace=tmp_path, progress=False)
    results = {r.stage: r for r in pipeline.run(until="chunk")}
    assert results["clean"].peak_rss_mb >= before["rss_mb"] + 590
    assert results["chunk"].peak_rss_mb < results["clean"].peak_rss_mb - 300
    assert results["clean"].flat()["peak_rss_mb"] == round(results["clean"].peak_rss_mb, 1)
    assert pipeline.ws.read_state("clean")["peak_rss_mb"] == results["clean"].peak_rss_mb


def test_killed_mid_stage_leaves_no_half_output_and_rerun_resumes(tmp_path, scifact_dir):
    """SIGKILL during the chunk stage of SciFact: nothing half-visible; the rerun redoes only chunk."""
    ws = tmp_path / "ws"
    spec = ROOT / "pipelines" / "scifact.yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*CLI, "run", str(spec), "--until", "chunk", "--workspace", str(ws)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clean_state = ws / "scifact" / "state" / "clean.json"
    deadline = time.time() + 300
    while not clean_state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert clean_state.exists(), "clean never finished"
    time.sleep(0.3)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    chunks = ws / "scifact" / "chunks"
    assert not datasets.is_complete(chunks)
    assert not (ws / "scifact" / "state" / "chunk.json").exists()

    results = {r.stage: r for r in Pipeline(load_spec(spec), workspace=ws, progress=False).run(until="chunk")}
    assert results["extract"].skipped and results["clean"].skipped and not results["chunk"].skipped
    assert datasets.count_rows(chunks) == results["chunk"].summary["rows"] > 5183
    assert not list((ws / "scifact").glob(".chunks.*")), "the killed writer's temp dir was cleaned up"


def test_cli_validate_reports_bad_specs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsource: {format: beir, path: d}\nchunk: {max_tokens: many}\n")
    out = cli("validate", bad)
    assert out.returncode == 2
    assert str(bad) in out.stderr and "chunk.max_tokens" in out.stderr
    ok = cli("validate", ROOT / "pipelines" / "demo.yaml")
    assert ok.returncode == 0 and json.loads(ok.stdout)["name"] == "demo"


def test_cli_inspect_and_unknown_stage(tmp_path):
    Pipeline(load_spec(ROOT / "pipelines" / "demo.yaml"), workspace=tmp_path, progress=False).run(until="extract")
    out = cli("inspect", "documents", "--spec", ROOT / "pipelines" / "demo.yaml", "--workspace", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "41 rows" in out.stderr and "doc_id" in out.stderr
    out = cli("run", ROOT / "pipelines" / "demo.yaml", "--until", "nope")
    assert out.returncode == 2 and "unknown stage 'nope'" in out.stderr


@pytest.mark.parametrize("command", [[], ["run"], ["validate"], ["inspect"]])
def test_every_command_has_help(command):
    out = cli(*command, "--help")
    assert out.returncode == 0
    assert "Usage" in out.stdout


@pytest.fixture(scope="module")
def published_demo(tmp_path_factory):
    """The demo pipeline run end to end twice (two snapshot versions) in one workspace."""
    ws = tmp_path_factory.mktemp("published")
    spec = load_spec(ROOT / "pipelines" / "demo.yaml")
    first = {r.stage: r for r in Pipeline(spec, workspace=ws, progress=False).run()}
    second = {r.stage: r for r in Pipeline(spec, workspace=ws, progress=False, force=True).run()}
    return ws, first, second


def test_full_demo_run_publishes_verified_snapshot_and_tracks_it(published_demo):
    from mlflow.tracking import MlflowClient

    from corpusforge.snapshots import SnapshotStore

    ws, first, second = published_demo
    assert first["embed"].summary["embedded"] == first["chunk"].summary["rows"]
    assert second["embed"].summary["embedded"] == 0  # forced rerun: every vector comes from the cache
    modes = first["evaluate"].summary["modes"]
    assert set(modes) == {"bm25", "dense", "hybrid"}
    assert modes["dense"]["metrics"]["ndcg@10"] > 0.8  # the demo queries are easy for the encoder
    store = SnapshotStore(str(ws / "snapshots"))
    versions = [v.version for v in store.versions("demo")]
    assert versions == [first["publish"].summary["version"], second["publish"].summary["version"]]
    assert store.resolve("demo", "production") == versions[-1]
    manifest = store.manifest("demo", versions[-1])
    assert manifest["corpus_hash"] == store.manifest("demo", versions[0])["corpus_hash"]
    # the device and precision the vectors were made with (their last bits depend on them)
    assert (manifest["model"]["device"], manifest["model"]["precision"]) == ("cpu", "fp32")
    assert {"chunks", "dense", "bm25", "eval"} <= {f.split("/")[0] for f in _manifest_paths(manifest)}
    assert store.verify("demo", versions[-1]).ok

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("demo")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    run = runs[0]
    assert run.data.params["chunk.max_tokens"] == "64"
    assert run.data.metrics["test/dense/ndcg_10"] == pytest.approx(modes["dense"]["metrics"]["ndcg@10"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/metrics.json", "eval/per_query.parquet", "eval/quality_vs_latency.png"} <= artifacts
    assert "manifest.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_configuration_is_params_metrics_are_grouped_and_inputs_have_digests(published_demo):
    from mlflow.tracking import MlflowClient

    ws, first, _ = published_demo
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("demo")
    assert exp.tags["mlflow.note.content"] == load_spec(ROOT / "pipelines" / "demo.yaml").description
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])[0]
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    # configuration restated by a stage is a param, never a metric
    assert params["embed/dim"] == "384" and params["evaluate/k"] == "100" and params["index/dense/factory"] == "Flat"
    assert params["test/dense/batch_size"] == "1.0" and params["index/dense/format_version"] == "1"
    assert not {"embed/dim", "index/dense/dim", "evaluate/k", "test/dense/batch_size"} & set(metrics)
    assert not [k for k in metrics if k.endswith("batch_size") or "format_version" in k]
    # one spelling: grouped with '/', the stage first, evaluation metrics as <split>/<mode>/<metric>
    assert metrics["embed/rows"] == metrics["chunk/rows"] and metrics["index/dense/ntotal"] == metrics["chunk/rows"]
    assert "dev/dense/ndcg_10" in metrics and "test/hybrid/latency_ms_p50" in metrics
    assert all("/" in k for k in metrics) and not [k for k in metrics if "@" in k or "." in k.split("/")[0]]
    assert tags["publish/version"] == first["publish"].summary["version"]
    # inputs: the corpus (digest: the snapshot's corpus hash) and the judged test queries, with digests
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    corpus = inputs["documents_clean"]
    assert corpus.dataset.digest == first["publish"].summary["corpus_hash"][:36]
    assert json.loads(corpus.dataset.profile)["num_rows"] == first["clean"].summary["rows"]
    assert {t.key: t.value for t in corpus.tags}["mlflow.data.context"] == "corpus"
    queries = inputs["queries/test"]
    assert {t.key: t.value for t in queries.tags}["mlflow.data.context"] == "evaluation"
    assert json.loads(queries.dataset.profile)["num_rows"] == first["evaluate"].summary["queries"]
    # source and git tags (the spec lies in this checkout)
    commit = tags["mlflow.source.git.commit"]
    assert len(commit) == 40 and tags["mlflow.source.type"] == "LOCAL"
    # the checkout's commit at build time: HEAD then, so HEAD or one of its ancestors now
    assert subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=ROOT).returncode == 0


def _manifest_paths(manifest) -> list[str]:
    files = manifest["files"]
    return list(files) if isinstance(files, dict) else [f["path"] for f in files]


def test_unchanged_rerun_skips_everything_including_publish(published_demo):
    from mlflow.tracking import MlflowClient

    ws, _, second = published_demo
    again = Pipeline(load_spec(ROOT / "pipelines" / "demo.yaml"), workspace=ws, progress=False).run()
    assert all(r.skipped for r in again)
    assert again[-1].summary["version"] == second["publish"].summary["version"]
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    assert len(client.search_runs([client.get_experiment_by_name("demo").experiment_id])) == 2  # no no-op run


def test_cli_snapshots_list_verify_rollback_promote(published_demo):
    ws, first, second = published_demo
    v1, v2 = first["publish"].summary["version"], second["publish"].summary["version"]
    args = ["--spec", ROOT / "pipelines" / "demo.yaml", "--workspace", ws]
    out = cli("snapshots", "list", *args)
    assert out.returncode == 0 and v1 in out.stderr and v2 in out.stderr
    out = cli("snapshots", "verify", "production", *args)
    assert out.returncode == 0 and "ok" in out.stderr
    out = cli("snapshots", "rollback", "--alias", "production", *args)
    assert out.returncode == 0 and v1 in out.stderr
    out = cli("snapshots", "promote", v2, "--alias", "production", *args)
    assert out.returncode == 0 and v2 in out.stderr
    out = cli("snapshots", "promote", "no-such-version", "--alias", "production", *args)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    # A tampered file fails verification with a non-zero exit.
    target = next((ws / "snapshots" / "demo" / v1 / "bm25").glob("*.json"))
    target.chmod(0o644)
    target.write_text(target.read_text() + " ")
    out = cli("snapshots", "verify", v1, *args)
    assert out.returncode == 1 and "FAILED" in out.stderr
