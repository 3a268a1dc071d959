"""Snapshot publishing on a local root: manifests, immutability, aliases, verification, crashes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from corpusforge.snapshots import (
    AliasError,
    ManifestError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    SnapshotStore,
    VerificationError,
    build_manifest,
)
from corpusforge.snapshots.manifest import VERSION_RE

INDEX = "scifact"


def make_build(parent: Path, seed: int = 0) -> Path:
    """A small but real build: a Parquet chunk store, a FAISS shard and BM25 files."""
    import faiss
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    build = parent / f"build-{seed}"
    (build / "chunks").mkdir(parents=True)
    (build / "dense").mkdir()
    (build / "bm25").mkdir()
    texts = [f"chunk {i} of build {seed}: aspirin reduces fever" for i in range(40)]
    table = pa.table({"chunk_id": [f"c{i}" for i in range(40)], "text": texts})
    pq.write_table(table, build / "chunks" / "part-00000.parquet")
    vectors = np.random.default_rng(seed).standard_normal((40, 8)).astype("float32")
    index = faiss.IndexFlatIP(8)
    index.add(vectors)
    faiss.write_index(index, str(build / "dense" / "shard-00000.faiss"))
    (build / "dense" / "dense.json").write_text(json.dumps({"factory": "Flat", "dim": 8, "shards": 1}))
    (build / "bm25" / "bm25.json").write_text(json.dumps({"k1": 1.5, "b": 0.75, "seed": seed}))
    (build / "bm25" / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate("aspirin reduces fever".split())}))
    return build


def manifest_for(build: Path, ndcg: float = 0.66) -> dict:
    return build_manifest(
        build,
        index_name=INDEX,
        spec={"name": "scifact", "chunk": {"max_tokens": 256}},
        model={"name": "all-MiniLM-L6-v2", "fingerprint": "abc123", "dim": 8},
        corpus_hash="c0ffee",
        index={"dense": {"factory": "Flat", "dim": 8, "shards": 1}, "bm25": {"k1": 1.5}},
        metrics={"ndcg@10": ndcg, "recall@100": 0.9, "split": "test"},
        extra={"mlflow_run_id": "r1"},
    )


def publish(store: SnapshotStore, tmp_path: Path, seed: int) -> str:
    build = make_build(tmp_path, seed)
    return store.publish(build, manifest_for(build, ndcg=0.6 + seed / 100))


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Change one byte in place (same size), undoing the read-only bits first."""
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(str(tmp_path / "snapshots"))


def test_publish_twice_gives_two_versions_in_order(store, tmp_path):
    v1 = publish(store, tmp_path, 1)
    v2 = publish(store, tmp_path, 2)
    assert VERSION_RE.match(v1) and VERSION_RE.match(v2)
    assert v1 < v2
    infos = store.versions(INDEX)
    assert [i.version for i in infos] == [v1, v2]
    assert all(i.complete and not i.problems for i in infos)
    assert infos[0].metrics == {"ndcg@10": pytest.approx(0.61), "recall@100": pytest.approx(0.9)}
    assert infos[0].n_files == 5 and infos[0].total_bytes > 0
    assert store.indexes() == [INDEX]
    assert store.incomplete(INDEX) == []


def test_manifest_lists_every_file_with_sha256(store, tmp_path):
    build = make_build(tmp_path)
    manifest = manifest_for(build)
    on_disk = sorted(p.relative_to(build).as_posix() for p in build.rglob("*") if p.is_file())
    assert [f["path"] for f in manifest["files"]] == on_disk
    for entry in manifest["files"]:
        data = (build / entry["path"]).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert {"python", "pyarrow", "numpy", "faiss", "bm25s", "corpusforge"} <= set(manifest["libraries"])
    assert manifest["created_at"].endswith("Z") and manifest["corpus_hash"] == "c0ffee"
    assert manifest["totals"] == {"files": 5, "bytes": sum(f["size"] for f in manifest["files"])}

    version = store.publish(build, manifest)
    stored = json.loads((Path(store.root) / INDEX / version / "manifest.json").read_text())
    assert stored == {**manifest, "version": version}
    assert store.manifest(INDEX, version)["model"]["fingerprint"] == "abc123"


def test_snapshot_files_are_read_only(store, tmp_path):
    version = publish(store, tmp_path, 0)
    snap = Path(store.root) / INDEX / version
    paths = list(snap.rglob("*"))
    assert len([p for p in paths if p.is_file()]) == 6  # 5 build files + manifest.json
    for p in [snap, *paths]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o222 == 0, f"{p} is writable ({oct(mode)})"
    assert not (Path(store.root) / INDEX / f".tmp-{version}").exists()


def test_publishing_over_an_existing_version_is_refused(store, tmp_path):
    build = make_build(tmp_path)
    manifest = manifest_for(build)
    version = store.publish(build, manifest)
    with pytest.raises(SnapshotExistsError, match="refusing to publish over"):
        store.publish(build, manifest)
    assert [i.version for i in store.versions(INDEX)] == [version]
    assert store.verify(INDEX, version).ok


def test_alias_set_resolve_promote_rollback(store, tmp_path):
    v1, v2, v3 = (publish(store, tmp_path, s) for s in (1, 2, 3))
    record = store.set_alias(INDEX, "production", v1)
    assert record["version"] == v1 and record["history"] == []
    assert store.resolve(INDEX, "production") == v1
    store.promote(INDEX, v2, "staging")
    store.promote(INDEX, "staging", "production")  # promote what staging points at
    store.promote(INDEX, v3, "production")
    assert store.aliases(INDEX) == {"production": v3, "staging": v2}
    record = store.alias_record(INDEX, "production")
    assert [h["version"] for h in record["history"]] == [v1, v2]
    by_version = {i.version: i.aliases for i in store.versions(INDEX)}
    assert by_version == {v1: (), v2: ("staging",), v3: ("production",)}

    assert store.rollback(INDEX, "production") == v2
    assert store.rollback(INDEX, "production") == v1
    assert store.resolve(INDEX, "production") == v1
    with pytest.raises(AliasError, match="no previous version"):
        store.rollback(INDEX, "production")
    with pytest.raises(AliasError, match="no alias 'canary'"):
        store.resolve(INDEX, "canary")
    with pytest.raises(SnapshotNotFoundError):
        store.set_alias(INDEX, "production", "20990101T000000.000000Z-00000000")
    with pytest.raises(ManifestError, match="invalid alias"):
        store.set_alias(INDEX, "../escape", v1)


def test_alias_switch_is_atomic_for_concurrent_readers(store, tmp_path):
    v1, v2 = publish(store, tmp_path, 1), publish(store, tmp_path, 2)
    store.set_alias(INDEX, "production", v1)
    alias_file = Path(store.root) / INDEX / "aliases" / "production.json"
    seen, errors = set(), []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.add(store.resolve(INDEX, "production"))
                seen.add(json.loads(alias_file.read_bytes())["version"])  # the raw file, too
            except Exception as e:  # a missing or half-written file would land here
                errors.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(50):
            store.promote(INDEX, v2 if i % 2 == 0 else v1, "production")
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert seen == {v1, v2}
    assert store.resolve(INDEX, "production") == v1
    assert len(store.alias_record(INDEX, "production")["history"]) == 50
    # no temp files left; .lock is the alias lock file (kept: it is the lock, not a leftover)
    assert sorted(p.name for p in alias_file.parent.iterdir()) == [".lock", "production.json"]


def test_verify_detects_modified_missing_and_extra_files(store, tmp_path):
    v_mod, v_missing, v_extra = (publish(store, tmp_path, s) for s in (1, 2, 3))
    root = Path(store.root) / INDEX
    assert all(store.verify(INDEX, v).ok for v in (v_mod, v_missing, v_extra))

    flip_byte(root / v_mod / "dense" / "shard-00000.faiss")
    report = store.verify(INDEX, v_mod)
    assert not report.ok and not report
    assert report.problems == ("checksum mismatch for 'dense/shard-00000.faiss': " + report.problems[0].split(": ", 1)[1],)
    assert report.files_checked == 5

    os.chmod(root / v_missing / "bm25", 0o755)
    (root / v_missing / "bm25" / "vocab.json").unlink()
    assert store.verify(INDEX, v_missing).problems == ("missing file 'bm25/vocab.json'",)

    os.chmod(root / v_extra / "chunks", 0o755)
    (root / v_extra / "chunks" / "part-00001.parquet").write_bytes(b"sneaky")
    assert store.verify(INDEX, v_extra).problems == ("unexpected file 'chunks/part-00001.parquet' (not in the manifest)",)

    complete = {i.version: i.complete for i in store.versions(INDEX)}
    # Listing sees sizes and names only: the missing and the extra file; the same-size edit needs verify.
    assert complete == {v_mod: True, v_missing: False, v_extra: False}
    with pytest.raises(SnapshotNotFoundError):
        store.verify(INDEX, "20990101T000000.000000Z-00000000")


def test_edited_manifest_is_detected(store, tmp_path):
    version = publish(store, tmp_path, 0)
    path = Path(store.root) / INDEX / version / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["metrics"]["ndcg@10"] = 0.99  # a flattering edit after the fact
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o644)
    path.write_text(json.dumps(manifest))
    report = store.verify(INDEX, version)
    assert not report.ok and "does not match its version id" in report.problems[0]
    assert store.versions(INDEX)[0].complete is False


def test_alias_cannot_point_at_a_corrupted_version(store, tmp_path):
    good, bad = publish(store, tmp_path, 1), publish(store, tmp_path, 2)
    store.set_alias(INDEX, "production", good)
    flip_byte(Path(store.root) / INDEX / bad / "chunks" / "part-00000.parquet")
    with pytest.raises(VerificationError, match="checksum mismatch") as err:
        store.promote(INDEX, bad, "production")
    assert err.value.report.ok is False
    assert store.resolve(INDEX, "production") == good
    with pytest.raises(VerificationError):
        store.fetch(INDEX, bad)

    # Rollback verifies too: the previous version got corrupted after it was replaced.
    third = publish(store, tmp_path, 3)
    store.promote(INDEX, third, "production")
    flip_byte(Path(store.root) / INDEX / good / "bm25" / "bm25.json", offset=0)
    with pytest.raises(VerificationError, match="roll alias 'production' back"):
        store.rollback(INDEX, "production")
    assert store.resolve(INDEX, "production") == third


def test_publish_failing_halfway_leaves_no_version_and_gc_cleans_up(store, tmp_path):
    good = publish(store, tmp_path, 1)
    store.set_alias(INDEX, "production", good)
    build = make_build(tmp_path, 2)
    manifest = manifest_for(build)
    # The third of five files (sorted) changes after the manifest was built: the copy fails
    # there, with the first files already staged.
    flip_byte(build / "chunks" / "part-00000.parquet")
    with pytest.raises(ManifestError, match="'chunks/part-00000.parquet' changed after its manifest"):
        store.publish(build, manifest)

    assert [i.version for i in store.versions(INDEX)] == [good]
    assert store.resolve(INDEX, "production") == good
    leftovers = store.incomplete(INDEX)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-")
    assert leftovers[0].n_files >= 2  # it really failed halfway
    with pytest.raises(SnapshotExistsError, match="interrupted"):
        store.publish(build, manifest)  # the leftover blocks a blind retry of the same version

    assert store.gc_incomplete(INDEX, older_than_s=3600) == []  # too recent: maybe still running
    assert store.gc_incomplete(INDEX) == [leftovers[0].name]
    assert store.incomplete(INDEX) == []
    assert sorted(p.name for p in (Path(store.root) / INDEX).iterdir()) == sorted(["aliases", good])
    retry = store.publish(build, manifest_for(build))  # a fresh manifest of the build as it is now
    assert store.verify(INDEX, retry).ok


def test_version_dir_without_manifest_is_incomplete_not_listed(store, tmp_path):
    good = publish(store, tmp_path, 1)
    stray = Path(store.root) / INDEX / "20200101T000000.000000Z-deadbeef" / "dense"
    stray.mkdir(parents=True)
    (stray / "shard-00000.faiss").write_bytes(b"partial")
    assert [i.version for i in store.versions(INDEX)] == [good]
    assert [i.name for i in store.incomplete(INDEX)] == ["20200101T000000.000000Z-deadbeef"]
    with pytest.raises(VerificationError, match="publish unfinished"):
        store.set_alias(INDEX, "production", "20200101T000000.000000Z-deadbeef")
    assert store.gc_incomplete(INDEX) == ["20200101T000000.000000Z-deadbeef"]


def test_fetch_local_returns_verified_snapshot_dir(store, tmp_path):
    version = publish(store, tmp_path, 0)
    path = store.fetch(INDEX, version)
    assert path == Path(store.root) / INDEX / version
    assert (path / "dense" / "dense.json").is_file()


def test_bad_builds_and_manifests_are_refused_clearly(store, tmp_path):
    build = make_build(tmp_path)
    manifest = manifest_for(build)
    (build / "bm25" / "late.json").write_text("{}")
    with pytest.raises(ManifestError, match="late.json"):
        store.publish(build, manifest)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ManifestError, match="holds no files"):
        manifest_for(empty)
    (empty / "manifest.json").write_text("{}")
    with pytest.raises(ManifestError, match="reserved"):
        manifest_for(empty)
    with pytest.raises(ManifestError, match="does not exist"):
        manifest_for(tmp_path / "nope")
    with pytest.raises(ManifestError, match="invalid index name"):
        build_manifest(build, index_name="a/b", spec={}, model={}, corpus_hash="", index={}, metrics={})
    broken = {**manifest_for(make_build(tmp_path, 9)), "files": [{"path": "../x", "size": 1, "sha256": "0" * 64}]}
    with pytest.raises(ManifestError, match="malformed manifest file entry"):
        store.publish(tmp_path / "build-9", broken)
    assert store.versions(INDEX) == []
    for bad_version in ("../build-0", ".tmp-x", "aliases"):
        with pytest.raises(SnapshotNotFoundError, match="is not a version id"):
            store.verify(INDEX, bad_version)
        with pytest.raises(SnapshotNotFoundError, match="is not a version id"):
            store.fetch(INDEX, bad_version)
    with pytest.raises(ValueError, match="unsupported snapshot root"):
        SnapshotStore("gs://bucket/x")


def test_versions_and_verify_render_in_rich_tables(store, tmp_path):
    from rich.console import Console
    from rich.table import Table

    build = make_build(tmp_path)
    manifest = build_manifest(build, index_name=INDEX, spec={}, model={"name": "m"}, corpus_hash="h", index={},
                              metrics={"bm25": {"ndcg@10": 0.662}, "dense": {"ndcg@10": 0.645}})
    version = store.publish(build, manifest)
    store.set_alias(INDEX, "production", version)
    assert store.resolve(INDEX, "production") == version

    rows = [i.as_row() for i in store.versions(INDEX)]
    table = Table(*rows[0].keys())
    for row in rows:
        table.add_row(*row.values())
    report = store.verify(INDEX, version)
    vtable = Table(*report.as_row().keys())
    vtable.add_row(*report.as_row().values())
    out = io.StringIO()
    console = Console(file=out, width=250)
    console.print(table)
    console.print(vtable)
    text = out.getvalue()
    assert version in text and "production" in text and "bm25.ndcg@10=0.6620" in text and "ok" in text
    assert json.dumps(store.versions(INDEX)[0].to_dict()) and json.dumps(report.to_dict())
