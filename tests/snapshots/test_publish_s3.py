"""Snapshot publishing on S3, against a real S3 API server (moto's, over HTTP)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import boto3
import pytest
from boto3.s3.transfer import TransferConfig

from corpusforge.snapshots import (
    ManifestError,
    SnapshotExistsError,
    SnapshotStore,
    VerificationError,
    build_manifest,
)

INDEX = "scifact"
PREFIX = "team/snapshots"
MiB = 1 << 20


def make_build(parent: Path, seed: int = 0, big_bytes: int = 0) -> Path:
    """A small but real build (Parquet chunks, a FAISS shard, BM25 files), optionally with a big file."""
    import faiss
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    build = parent / f"build-{seed}"
    for d in ("chunks", "dense", "bm25"):
        (build / d).mkdir(parents=True)
    table = pa.table({"chunk_id": [f"c{i}" for i in range(30)], "text": [f"text {i} seed {seed}" for i in range(30)]})
    pq.write_table(table, build / "chunks" / "part-00000.parquet")
    index = faiss.IndexFlatIP(8)
    index.add(np.random.default_rng(seed).standard_normal((30, 8)).astype("float32"))
    faiss.write_index(index, str(build / "dense" / "shard-00000.faiss"))
    (build / "dense" / "dense.json").write_text(json.dumps({"factory": "Flat", "dim": 8}))
    (build / "bm25" / "bm25.json").write_text(json.dumps({"k1": 1.5, "seed": seed}))
    if big_bytes:
        (build / "dense" / "shard-00001.faiss").write_bytes(np.random.default_rng(seed).bytes(big_bytes))
    return build


def manifest_for(build: Path, ndcg: float = 0.66) -> dict:
    return build_manifest(
        build, index_name=INDEX, spec={"name": "scifact"}, model={"name": "all-MiniLM-L6-v2", "fingerprint": "abc"},
        corpus_hash="c0ffee", index={"dense": {"factory": "Flat", "dim": 8}}, metrics={"ndcg@10": ndcg},
    )


class UploadsFailAfter:
    """A boto3 client that loses the network after ``n`` uploads: later uploads and deletes fail.

    The fault sits in the transport; the store logic above it is the real one.
    """

    def __init__(self, client, n: int) -> None:
        self._client = client
        self._left = n
        self.uploads = 0

    def upload_fileobj(self, *args, **kwargs):
        if self._left <= 0:
            raise ConnectionError("simulated network failure during upload")
        self._left -= 1
        self.uploads += 1
        return self._client.upload_fileobj(*args, **kwargs)

    def put_object(self, *args, **kwargs):
        if self._left <= 0:
            raise ConnectionError("simulated network failure during put")
        return self._client.put_object(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


@pytest.fixture
def s3(s3_server, s3_bucket):
    return boto3.client("s3", endpoint_url=s3_server["endpoint_url"])


@pytest.fixture
def store(s3_server, s3_bucket) -> SnapshotStore:
    return SnapshotStore(f"s3://{s3_bucket}/{PREFIX}", endpoint_url=s3_server["endpoint_url"])


def publish(store: SnapshotStore, tmp_path: Path, seed: int) -> str:
    build = make_build(tmp_path, seed)
    return store.publish(build, manifest_for(build, ndcg=0.6 + seed / 100))


def keys(s3, bucket: str, prefix: str) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def test_s3_publish_list_verify_alias_fetch(store, s3, s3_bucket, tmp_path):
    v1, v2 = publish(store, tmp_path, 1), publish(store, tmp_path, 2)
    assert v1 < v2
    infos = store.versions(INDEX)
    assert [(i.version, i.complete) for i in infos] == [(v1, True), (v2, True)]
    assert infos[1].metrics == {"ndcg@10": pytest.approx(0.62)}
    assert keys(s3, s3_bucket, f"{PREFIX}/{INDEX}/{v1}/") == sorted(
        f"{PREFIX}/{INDEX}/{v1}/{rel}"
        for rel in ("bm25/bm25.json", "chunks/part-00000.parquet", "dense/dense.json", "dense/shard-00000.faiss", "manifest.json")
    )
    report = store.verify(INDEX, v2)
    assert report.ok and report.files_checked == 4 and report.bytes_checked == infos[1].total_bytes

    store.set_alias(INDEX, "production", v1)
    store.promote(INDEX, v2, "production")
    assert store.aliases(INDEX) == {"production": v2}
    assert store.rollback(INDEX, "production") == v1
    assert store.resolve(INDEX, "production") == v1
    assert store.indexes() == [INDEX]

    cache = tmp_path / "cache"
    path = store.fetch(INDEX, store.resolve(INDEX, "production"), cache)
    assert path == cache / INDEX / v1
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["version"] == v1
    for entry in manifest["files"]:
        local = path / entry["path"]
        assert hashlib.sha256(local.read_bytes()).hexdigest() == entry["sha256"]
        assert stat.S_IMODE(local.stat().st_mode) & 0o222 == 0
    assert [p.name for p in (cache / INDEX).iterdir()] == [v1]  # no temp download dir left
    assert store.fetch(INDEX, v1, cache) == path  # a verified cached copy is reused


def test_s3_big_file_goes_multipart_and_verifies(s3_server, s3_bucket, s3, tmp_path):
    config = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    store = SnapshotStore(f"s3://{s3_bucket}/{PREFIX}", s3_server["endpoint_url"], transfer_config=config)
    build = make_build(tmp_path, 0, big_bytes=11 * MiB)
    version = store.publish(build, manifest_for(build))
    head = s3.head_object(Bucket=s3_bucket, Key=f"{PREFIX}/{INDEX}/{version}/dense/shard-00001.faiss")
    assert head["ContentLength"] == 11 * MiB
    assert head["ETag"].strip('"').endswith("-3")  # three parts: 5 + 5 + 1 MiB
    report = store.verify(INDEX, version)
    assert report.ok and report.bytes_checked > 11 * MiB
    path = store.fetch(INDEX, version, tmp_path / "cache")
    assert (path / "dense" / "shard-00001.faiss").read_bytes() == (build / "dense" / "shard-00001.faiss").read_bytes()


def test_s3_corruption_is_detected_and_refused(store, s3, s3_bucket, tmp_path):
    good, bad = publish(store, tmp_path, 1), publish(store, tmp_path, 2)
    store.set_alias(INDEX, "production", good)
    key = f"{PREFIX}/{INDEX}/{bad}/dense/shard-00000.faiss"
    data = bytearray(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF  # same size: only hashing can tell
    s3.put_object(Bucket=s3_bucket, Key=key, Body=bytes(data))

    report = store.verify(INDEX, bad)
    assert not report.ok
    assert report.problems[0].startswith("checksum mismatch for 'dense/shard-00000.faiss'")
    with pytest.raises(VerificationError, match="checksum mismatch"):
        store.promote(INDEX, bad, "production")
    assert store.resolve(INDEX, "production") == good
    with pytest.raises(VerificationError):
        store.fetch(INDEX, bad, tmp_path / "cache")
    assert not (tmp_path / "cache" / INDEX / bad).exists()
    assert list((tmp_path / "cache" / INDEX).iterdir()) == []  # the failed download was removed

    s3.delete_object(Bucket=s3_bucket, Key=f"{PREFIX}/{INDEX}/{bad}/bm25/bm25.json")
    s3.put_object(Bucket=s3_bucket, Key=f"{PREFIX}/{INDEX}/{bad}/dense/extra.bin", Body=b"x")
    problems = store.verify(INDEX, bad).problems
    assert "missing file 'bm25/bm25.json'" in problems
    assert "unexpected file 'dense/extra.bin' (not in the manifest)" in problems
    assert {i.version: i.complete for i in store.versions(INDEX)} == {good: True, bad: False}


def test_s3_damaged_cache_copy_is_replaced(store, tmp_path):
    version = publish(store, tmp_path, 0)
    cache = tmp_path / "cache"
    path = store.fetch(INDEX, version, cache)
    target = path / "dense" / "dense.json"
    os.chmod(target.parent, 0o755)
    os.chmod(target, 0o644)
    target.write_text('{"factory": "HNSW32"}')
    again = store.fetch(INDEX, version, cache)
    assert again == path
    assert json.loads(target.read_text()) == {"factory": "Flat", "dim": 8}


def test_s3_upload_failing_halfway_leaves_alias_and_no_complete_version(s3_server, s3_bucket, s3, store, tmp_path):
    good = publish(store, tmp_path, 1)
    store.set_alias(INDEX, "production", good)
    flaky = UploadsFailAfter(boto3.client("s3", endpoint_url=s3_server["endpoint_url"]), n=2)
    flaky_store = SnapshotStore(f"s3://{s3_bucket}/{PREFIX}", client=flaky)
    build = make_build(tmp_path, 2)
    manifest = manifest_for(build)
    with pytest.raises(ConnectionError, match="simulated network failure"):
        flaky_store.publish(build, manifest)
    assert flaky.uploads == 2

    assert [i.version for i in store.versions(INDEX)] == [good]
    assert store.resolve(INDEX, "production") == good
    leftovers = store.incomplete(INDEX)
    assert len(leftovers) == 1 and leftovers[0].n_files == 2
    partial = leftovers[0].name
    assert not keys(s3, s3_bucket, f"{PREFIX}/{INDEX}/{partial}/manifest.json")
    with pytest.raises(VerificationError, match="publish unfinished"):
        store.set_alias(INDEX, "production", partial)
    with pytest.raises(SnapshotExistsError, match="interrupted"):
        store.publish(build, manifest)  # the leftover blocks a blind retry of the same version

    assert store.gc_incomplete(INDEX) == [partial]
    assert keys(s3, s3_bucket, f"{PREFIX}/{INDEX}/{partial}/") == []
    assert store.incomplete(INDEX) == []
    assert store.resolve(INDEX, "production") == good


def test_s3_publish_over_existing_version_is_refused(store, tmp_path):
    build = make_build(tmp_path, 0)
    manifest = manifest_for(build)
    version = store.publish(build, manifest)
    with pytest.raises(SnapshotExistsError, match="refusing to publish over"):
        store.publish(build, manifest)
    assert [i.version for i in store.versions(INDEX)] == [version]
    assert store.verify(INDEX, version).ok


def test_s3_build_changed_after_manifest_stops_before_commit(store, tmp_path):
    build = make_build(tmp_path, 0)
    manifest = manifest_for(build)
    path = build / "dense" / "shard-00000.faiss"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="changed after its manifest"):
        store.publish(build, manifest)
    assert store.versions(INDEX) == []
    assert len(store.incomplete(INDEX)) == 1
