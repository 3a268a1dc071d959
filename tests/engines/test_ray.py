"""The Ray engine against the local one: the demo pipeline on a two-node local Ray cluster.

The same spec runs with ``execution.engine: local`` and ``ray`` (one CPU and a 100 MB object
store per node, 16 input rows per task: 3 tasks for the 41 documents, so every stage spreads over
several tasks and both nodes); the documents, chunks, quarantines, vectors (fp32, bitwise), index
files, top-k and metrics must all be the same. A second test removes a worker node while embed is encoding: the stage still
completes, with the same vectors.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from corpusforge.data import datasets
from corpusforge.pipeline import Pipeline
from corpusforge.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
STORE = 100 * 1024 * 1024
UNTIL_EVALUATE = ["extract", "clean", "chunk", "embed", "index", "evaluate"]

# one local Ray at a time on the machine (test_ray.py, test_ray_jobs.py): one xdist worker
pytestmark = pytest.mark.xdist_group("ray")


def _spec(engine: str, address: str | None = None, **execution):
    spec = load_spec(ROOT / "pipelines" / "demo.yaml")
    return spec.model_copy(update={"execution": spec.execution.model_copy(
        update={"engine": engine, "address": address, "rows_per_task": 16, **execution})})


def _run(spec, root: Path, stages=UNTIL_EVALUATE) -> Pipeline:
    pipeline = Pipeline(spec, workspace=root, progress=False)
    for stage in stages:
        pipeline.run_stage(stage)
    return pipeline


@pytest.fixture(scope="module")
def cluster():
    """A two-node local Ray cluster (head + one worker node, one CPU each); the test process drives it."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE,
                                                      "include_dashboard": False})
    c.add_node(num_cpus=1, object_store_memory=STORE)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Pipeline:
    return _run(_spec("local"), tmp_path_factory.mktemp("local"))


def _content(path: Path, key: str) -> list[tuple[str, str]]:
    """(id, sha256 of the row as JSON) per row, in file order."""
    rows = datasets.read_table(path).to_pylist()
    return [(r[key], hashlib.sha256(json.dumps(r, sort_keys=True, default=str).encode()).hexdigest())
            for r in rows]


def _vectors(path: Path) -> tuple[list[str], np.ndarray]:
    from corpusforge.stages.model import load_vectors

    return load_vectors(path)


def _files(directory: Path, skip: set[str]) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.name not in skip}


def _json_without(path: Path, *keys: str) -> dict:
    data = json.loads(path.read_text())
    for k in keys:
        data.pop(k, None)
    return data


def _metrics(path: Path) -> dict:
    """metrics.json without latencies (wall-clock, different on every run)."""
    data = json.loads(path.read_text())
    out = {mode: v["metrics"] for mode, v in data["modes"].items()}
    out["sweep"] = [{k: v for k, v in p.items() if "ms" not in k and "latency" not in k and "qps" not in k}
                    for p in data["sweep"]]
    return out


def _topk(pipeline: Pipeline) -> dict:
    from corpusforge.evaluation.offline import judged_queries, load_searcher
    from corpusforge.stages import retriever

    spec, ws = pipeline.spec, pipeline.ws
    searcher, _ = load_searcher(spec, ws, retriever(spec, ws))
    queries, qrels = judged_queries(spec, spec.evaluate.split)
    texts = [queries[q] for q in sorted(qrels)]
    return {mode: [[(h.doc_id, round(float(h.score), 6)) for h in hits]
                   for hits in searcher.search_batch(texts, k=10, mode=mode)]
            for mode in ("bm25", "dense", "hybrid")}


def test_ray_engine_output_equals_local(cluster, local_run, tmp_path):
    ray_run = _run(_spec("ray", cluster.address), tmp_path)
    a, b = local_run.ws, ray_run.ws

    # the work really was spread: several tasks, so several part files, and both nodes were alive
    assert len(list(b.dataset("chunks").glob("part-*.parquet"))) > 1
    assert len([n for n in __import__("ray").nodes() if n["Alive"]]) == 2

    for name, key in (("documents", "doc_id"), ("documents_clean", "doc_id"), ("chunks", "chunk_id")):
        local, distributed = _content(a.dataset(name), key), _content(b.dataset(name), key)
        assert sorted(distributed) == sorted(local), name  # the same rows (content hash by id)
        assert distributed == local, name  # and in the same order (the indexes' row numbers)
    for stage in ("extract", "clean", "chunk"):
        assert datasets.read_table(b.quarantine(stage)).to_pylist() == \
            datasets.read_table(a.quarantine(stage)).to_pylist()
    assert datasets.count_rows(a.dataset("chunks")) == 44

    ids_a, vec_a = _vectors(a.dataset("embeddings"))
    ids_b, vec_b = _vectors(b.dataset("embeddings"))
    assert ids_a == ids_b
    assert vec_a.dtype == vec_b.dtype == np.float32
    assert vec_a.tobytes() == vec_b.tobytes()  # bitwise

    timing = {"build_seconds", "train_seconds", "add_seconds"}
    assert _files(b.index_dir / "bm25", {"bm25.json"}) == _files(a.index_dir / "bm25", {"bm25.json"})
    assert _json_without(b.index_dir / "bm25" / "bm25.json", *timing) == \
        _json_without(a.index_dir / "bm25" / "bm25.json", *timing)
    assert _files(b.index_dir / "dense", {"dense.json"}) == _files(a.index_dir / "dense", {"dense.json"})
    assert _json_without(b.index_dir / "dense" / "dense.json", *timing) == \
        _json_without(a.index_dir / "dense" / "dense.json", *timing)

    assert _topk(ray_run) == _topk(local_run)
    assert _metrics(b.eval_dir / "metrics.json") == _metrics(a.eval_dir / "metrics.json")

    # the stage summaries agree too (timings and the engine's own facts aside)
    for stage in ("extract", "clean", "chunk"):
        assert b.read_state(stage)["summary"] == a.read_state(stage)["summary"], stage
    ea, eb = a.read_state("embed")["summary"], b.read_state("embed")["summary"]
    for key in ("rows", "embedded", "cached", "duplicates", "dim", "model_fingerprint"):
        assert eb[key] == ea[key], key


def _words(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(5000)]
    return [vocab[i] for i in rng.integers(0, len(vocab), n)]


def _dedup_corpus(root: Path) -> Path:
    """Three jsonl files with every kind of duplicate, in an order where first-seen is not smallest-id."""
    t1, t2 = _words(1, 200), _words(2, 200)
    near1 = t1[:100] + ["changed"] + t1[101:]
    near1b = t1[:150] + ["altered"] + t1[151:]
    chain = near1[:40] + ["again"] + near1[41:]  # near near1 (refused) and near t1
    files = {
        "a.jsonl": [("d01", t1), ("d02", t1), ("d03", near1), ("d04", []), ("d12", _words(3, 50))],
        "b.jsonl": [("d01", _words(4, 80)), ("d06", t2), ("d07", chain), ("d08", None), ("d09", None),
                    ("d13", _words(5, 60))],
        "c.jsonl": [("d03", near1), ("d10", near1b), ("d00", t2), ("d14", _words(6, 30)), ("d15", _words(6, 30))],
    }
    src = root / "corpus"
    src.mkdir()
    for name, docs in files.items():
        lines = []
        for doc_id, words in docs:
            text = "!!! ???" if words is None else " ".join(words)
            lines.append(json.dumps({"_id": doc_id, "title": "", "text": text}))
        lines.insert(1, "{not json")
        (src / name).write_text("\n".join(lines) + "\n")
    spec = root / "dedup.yaml"
    spec.write_text(f"name: dedup\nsource: {{format: jsonl, path: {src}}}\n"
                    "clean: {near_duplicates: {enabled: true, threshold: 0.9}}\n")
    return spec


def test_ray_dedup_decisions_equal_local(cluster, tmp_path):
    """Duplicate ids, exact, near and chained near duplicates, spread over many small tasks."""
    spec_path = _dedup_corpus(tmp_path)
    base = load_spec(spec_path)
    runs = {}
    for engine in ("local", "ray"):
        spec = base.model_copy(update={"execution": base.execution.model_copy(
            update={"engine": engine, "address": cluster.address, "rows_per_task": 2})})
        runs[engine] = _run(spec, tmp_path / engine, ["extract", "clean"])
    a, b = runs["local"].ws, runs["ray"].ws
    for name in ("documents", "documents_clean"):
        assert datasets.read_table(b.dataset(name)).to_pylist() == datasets.read_table(a.dataset(name)).to_pylist()
    for stage in ("extract", "clean"):
        assert datasets.read_table(b.quarantine(stage)).to_pylist() == \
            datasets.read_table(a.quarantine(stage)).to_pylist()
        assert b.read_state(stage)["summary"] == a.read_state(stage)["summary"]
    reasons = a.read_state("clean")["summary"]["quarantine_reasons"]
    # the corpus does exercise every dedup rule (so equality above is not vacuous)
    assert reasons["exact_duplicate"] >= 2 and reasons["near_duplicate"] >= 3 and reasons["empty_text"] == 1
    assert a.read_state("extract")["summary"]["quarantine_reasons"] == {"duplicate_id": 2, "malformed_json": 3}
    kept = set(datasets.read_table(a.dataset("documents_clean")).column("doc_id").to_pylist())
    assert {"d01", "d06", "d08"} <= kept and not kept & {"d00", "d02", "d03", "d07", "d09", "d10"}
    assert len(list(b.dataset("documents_clean").glob("part-*.parquet"))) > 3


def test_worker_node_lost_during_embed(cluster, tmp_path):
    """A worker node removed while the encoder actors work: embed completes, vectors unchanged."""
    from corpusforge.encoding.embed import embed_chunks

    src = tmp_path / "corpus"
    src.mkdir()
    (src / "docs.jsonl").write_text("".join(
        json.dumps({"_id": f"doc{i:04d}", "title": "", "text": " ".join(_words(100 + i, 120))}) + "\n"
        for i in range(120)))
    spec = load_spec(ROOT / "pipelines" / "demo.yaml").model_copy(update={"name": "killed"})
    spec = spec.model_copy(update={
        "source": spec.source.model_copy(update={"format": "jsonl", "path": str(src)}),
        "execution": spec.execution.model_copy(update={
            "engine": "ray", "address": cluster.address, "rows_per_task": 60, "embed_actors": 3,
            "embed_block_texts": 16})})
    pipeline = _run(spec, tmp_path / "ws", ["extract", "clean", "chunk"])
    chunks = pipeline.ws.dataset("chunks")
    blocks = -(-datasets.count_rows(chunks) // 16)

    doomed = cluster.add_node(num_cpus=1, object_store_memory=STORE)  # three CPUs: one actor per node
    cluster.wait_for_nodes()
    outcome: dict = {}

    def embed():
        try:
            outcome["summary"] = pipeline.run_stage("embed").summary
        except BaseException as exc:  # re-raised below, in the test's thread
            outcome["error"] = exc

    worker = threading.Thread(target=embed)
    worker.start()
    shards = pipeline.ws.embedding_cache
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and worker.is_alive() and len(list(shards.glob("*/shard-*"))) < 2:
        time.sleep(0.02)
    done_at_kill = len(list(shards.glob("*/shard-*")))
    driver_node = __import__("ray")._private.worker.global_worker.node
    assert doomed._raylet_socket_name != driver_node._raylet_socket_name, "the driver is attached to the doomed node"
    cluster.remove_node(doomed)
    worker.join(600)
    assert not worker.is_alive(), "embed did not finish after the node was lost"
    if "error" in outcome:
        raise outcome["error"]
    assert 0 < done_at_kill < blocks, (done_at_kill, blocks)  # the node died mid-stage

    # the same vectors as the local engine encoding the same blocks (bitwise)
    reference = tmp_path / "reference"
    embed_chunks(chunks, reference, tmp_path / "cache", spec.model, progress=False, block_size=16)
    ids_a, vec_a = _vectors(reference)
    ids_b, vec_b = _vectors(pipeline.ws.dataset("embeddings"))
    assert ids_a == ids_b
    assert vec_a.tobytes() == vec_b.tobytes()
    assert outcome["summary"]["embedded"] == len(ids_a)


@pytest.mark.slow  # ~100 s in make test (actors starved at nice 15 beside the other worker): make test-all
def test_ray_embed_over_several_windows_with_repeated_texts_equals_local(cluster, tmp_path, monkeypatch):
    """Blocks are cut at the local engine's window boundaries, so the vectors stay bitwise equal.

    Windows of 24 chunks (patched from 131,072) and blocks of 16 texts; every fifth chunk repeats
    one text, so a window holds 19 or 20 texts to encode, not a multiple of 16. A block running on
    across a window boundary batches texts that the local engine batches apart, which changes
    their last bits (it did, before blocks were cut at windows).
    """
    from corpusforge.encoding import embed as local_embed
    from corpusforge.engines import ray_embed
    from corpusforge.stages import StageContext
    from tests.encoding.test_embed import write_chunks

    monkeypatch.setattr(local_embed, "WINDOW_ROWS", 24)
    spec = _spec("ray", cluster.address, rows_per_task=90, embed_block_texts=16)
    ws = Pipeline(spec, workspace=tmp_path / "ws", progress=False).ws
    texts = [" ".join(_words(0, 20) if i % 5 == 0 else _words(1000 + i, 5 + i % 40)) for i in range(90)]
    write_chunks(ws.dataset("chunks"), texts)

    summary = ray_embed.embed(StageContext(spec, ws, progress=False), spec.model, "embeddings")
    reference = local_embed.embed_chunks(ws.dataset("chunks"), tmp_path / "reference", tmp_path / "cache",
                                         spec.model, progress=False, block_size=16)
    assert summary["rows"] == 90 and summary["embedded"] == reference["embedded"] == 73
    ids_a, vec_a = _vectors(tmp_path / "reference")
    ids_b, vec_b = _vectors(ws.dataset("embeddings"))
    assert ids_a == ids_b
    assert vec_a.tobytes() == vec_b.tobytes()


def test_ray_ivfpq_shards_equal_local(cluster, tmp_path):
    """IVF-PQ trained once on the local engine's sample, one shard per task: the same files and recall."""
    import pyarrow as pa

    from corpusforge.engines.ray_index import dense
    from corpusforge.index.dense import DenseIndex
    from corpusforge.data.schemas import embeddings_schema
    from corpusforge.spec import DenseIndexConfig, ExecutionConfig

    rng = np.random.default_rng(7)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    path = tmp_path / "embeddings"
    with datasets.DatasetWriter(path, embeddings_schema(32), rows_per_file=700) as w:  # several files
        w.write_table(pa.table({"chunk_id": [f"c{i}" for i in range(len(x))],
                                "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 32)}))
        w.commit({"dim": 32})
    cfg = DenseIndexConfig(factory="IVF16,PQ8x8", shards=3, train_sample=1000)
    local = DenseIndex.build(x, cfg, progress=False)
    local.save(tmp_path / "local")
    index, rows = dense(path, tmp_path / "ray", cfg, ExecutionConfig(engine="ray", address=cluster.address))
    assert rows == 3000 and index.info["train_rows"] == 1000
    timing = {"build_seconds", "train_seconds", "add_seconds"}
    assert _files(tmp_path / "ray", {"dense.json"}) == _files(tmp_path / "local", {"dense.json"})
    assert _json_without(tmp_path / "ray" / "dense.json", *timing) == \
        _json_without(tmp_path / "local" / "dense.json", *timing)
    q = x[:20]
    assert [a.tolist() for a in DenseIndex.load(tmp_path / "ray").search(q, 5)] == \
        [a.tolist() for a in local.search(q, 5)]


def test_cli_engine_options_are_checked(tmp_path):
    from typer.testing import CliRunner

    from corpusforge.cli import _with_engine, app

    spec = str(ROOT / "pipelines" / "demo.yaml")
    for args in (["--engine", "spark"], ["--engine", "local", "--ray-address", "auto"]):
        result = CliRunner().invoke(app, ["run", spec, "--workspace", str(tmp_path), *args])
        assert result.exit_code == 2, result.output
        assert "--engine" in result.output
    base = load_spec(spec)
    assert _with_engine(base, None, None).execution.engine == "local"
    via_address = _with_engine(base, None, "ray://head:10001").execution
    assert (via_address.engine, via_address.address) == ("ray", "ray://head:10001")
    assert _with_engine(base, "ray", None).execution.address is None


def test_execution_section_defaults_to_local_and_is_validated(tmp_path):
    from corpusforge.spec import SpecError

    assert load_spec(ROOT / "pipelines" / "demo.yaml").execution.engine == "local"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsource: {format: beir, path: .}\nexecution: {engine: spark, rows_per_task: 0}\n")
    with pytest.raises(SpecError) as err:
        load_spec(bad)
    fields = [f for f, _ in err.value.problems]
    assert "execution.engine" in fields and "execution.rows_per_task" in fields


def test_engine_is_not_part_of_any_fingerprint(tmp_path):
    spec = load_spec(ROOT / "pipelines" / "demo.yaml")
    on_ray = spec.model_copy(update={"execution": spec.execution.model_copy(
        update={"engine": "ray", "address": "auto", "rows_per_task": 8})})
    a, b = Pipeline(spec, tmp_path, progress=False), Pipeline(on_ray, tmp_path, progress=False)
    assert [a.fingerprint(s) for s in UNTIL_EVALUATE] == [b.fingerprint(s) for s in UNTIL_EVALUATE]
