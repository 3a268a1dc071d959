"""The check that a snapshot's parts belong together (rows, model), as verify runs it locally and on S3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corpusforge.snapshots import SnapshotStore, build_manifest
from corpusforge.snapshots.consistency import consistency_problems, local_consistency_problems

ENCODER = "533617c66cf96b5f"


def make_build(parent: Path, chunks: int = 40, dense: int = 40, bm25: int = 40, dim: int = 8,
               built_from: str = ENCODER) -> Path:
    """A build with the metadata files the pipeline writes (counts, dimension, model fingerprint)."""
    build = parent / "build"
    for part in ("chunks", "dense", "bm25"):
        (build / part).mkdir(parents=True)
    (build / "chunks" / "part-00000.parquet").write_bytes(b"rows")
    (build / "chunks" / "_dataset.json").write_text(json.dumps({"rows": chunks, "dataset": "chunks"}))
    (build / "dense" / "shard-00000.faiss").write_bytes(b"vectors")
    (build / "dense" / "dense.json").write_text(json.dumps({"factory": "Flat", "dim": dim, "ntotal": dense,
                                                            "shard_offsets": [0, dense],
                                                            "model_fingerprint": built_from}))
    (build / "bm25" / "bm25.json").write_text(json.dumps({"num_docs": bm25}))
    return build


def manifest_for(build: Path, dim: int = 8, encoder: str = ENCODER) -> dict:
    return build_manifest(build, index_name="demo", spec={"name": "demo"},
                          model={"name": "default", "fingerprint": "f", "encoder_fingerprint": encoder, "dim": dim},
                          corpus_hash="c0ffee", index={}, metrics={})


@pytest.mark.parametrize("build_args, manifest_args, problem", [
    ({}, {}, None),
    ({"dense": 104, "chunks": 44, "bm25": 44}, {}, "dense index has 104 rows, the chunks table has 44"),
    ({"bm25": 39}, {}, "bm25 index has 39 rows, the chunks table has 40"),
    ({"dim": 16}, {}, "dense index has dimension 16, the manifest's model has 8"),
    ({"built_from": "0123456789abcdef"}, {},
     f"dense index was built from vectors of model 0123456789abcdef, the manifest's model is {ENCODER}"),
    ({}, {"encoder": "fedcba9876543210"},
     f"dense index was built from vectors of model {ENCODER}, the manifest's model is fedcba9876543210"),
])
def test_parts_that_disagree_are_named(tmp_path, build_args, manifest_args, problem):
    build = make_build(tmp_path, **build_args)
    found = local_consistency_problems(build, manifest_for(build, **manifest_args))
    assert found == ([] if problem is None else [problem])


def test_facts_a_part_does_not_record_are_not_compared():
    assert consistency_problems({}, lambda rel: None) == []
    assert consistency_problems({}, {"dense/dense.json": {"ntotal": 3}, "bm25/bm25.json": {"num_docs": 4}}.get) == [
        "dense index has 3 rows, the BM25 index has 4"]


def test_verify_fails_on_disagreement_locally_and_on_s3(tmp_path, s3_server, s3_bucket):
    for root in (str(tmp_path / "snapshots"), f"s3://{s3_bucket}/snaps"):
        store = SnapshotStore(root, endpoint_url=s3_server["endpoint_url"] if root.startswith("s3") else None)
        good = make_build(tmp_path / f"good-{len(root)}")
        ok = store.publish(good, manifest_for(good))
        bad = make_build(tmp_path / f"bad-{len(root)}", dense=41)
        broken = store.publish(bad, manifest_for(bad))
        assert store.verify("demo", ok).ok
        report = store.verify("demo", broken)
        assert not report.ok and report.problems == ("dense index has 41 rows, the chunks table has 40",), root
