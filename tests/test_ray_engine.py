"""The Ray engine against the local one: the demo pipeline on a two-node local Ray cluster.

The same spec runs with ``execution.engine: local`` and ``ray`` (one CPU and a 100 MB object
store per node, 8 input rows per task so every stage spreads over several tasks and both nodes);
the documents, chunks, quarantines, vectors (fp32, bitwise), index files, top-k and metrics must
all be the same. A second test removes a worker node while embed is encoding: the stage still
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

from corpusforge import datasets
from corpusforge.pipeline import Pipeline
from corpusforge.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
STORE = 100 * 1024 * 1024
UNTIL_EVALUATE = ["extract", "clean", "chunk", "embed", "index", "evaluate"]


def _spec(engine: str, address: str | None = None, **execution):
    spec = load_spec(ROOT / "pipelines" / "demo.yaml")
    return spec.model_copy(update={"execution": spec.execution.model_copy(
        update={"engine": engine, "address": address, "rows_per_task": 8, **execution})})


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
    from corpusforge.offline_eval import judged_queries, load_searcher
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
