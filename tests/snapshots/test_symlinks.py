"""Snapshot files that are symbolic links (to anything, inside or outside the root) are refused by
verify, promote, fetch and the serving loader; the loader opens files without following links."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from corpusforge.data.datasets import DatasetWriter
from corpusforge.index.bm25 import BM25Index
from corpusforge.data.schemas import CHUNKS
from corpusforge.retrieval.search import UNRESTRICTED
from corpusforge.serve import open_snapshot
from corpusforge.snapshots import SnapshotStore, VerificationError, build_manifest
from corpusforge.snapshots.nofollow import UnsafePathError, pin_tree
from corpusforge.spec import Bm25Config
from tests.snapshots.test_publish import INDEX, make_build, manifest_for

TEXTS = ["aspirin reduces fever and pain", "photosynthesis turns sunlight into sugar",
         "black holes bend light", "vitamin d supports bone health"]


def writable(path: Path) -> None:
    """Undo the read-only bit of a published directory (what the store's owner can always do)."""
    path.chmod(path.stat().st_mode | stat.S_IWUSR)


def link_outside(path: Path, outside: Path) -> Path:
    """Move a published file out of the root and leave a symlink to it in its place."""
    outside.parent.mkdir(parents=True, exist_ok=True)
    writable(path.parent)
    shutil.copyfile(path, outside)
    path.unlink()
    path.symlink_to(outside)
    return outside


def servable_build(parent: Path, texts: list[str]) -> Path:
    """A BM25-only snapshot build the serving loader can open (no encoder needed)."""
    build = parent / "servable-build"
    with DatasetWriter(build / "chunks", CHUNKS) as w:
        w.write_rows({"chunk_id": f"d{i}#0", "doc_id": f"d{i}", "ordinal": 0, "text": t, "n_tokens": len(t.split()),
                      "char_start": 0, "char_end": len(t), "acl": [], "metadata": "{}"} for i, t in enumerate(texts))
        w.commit()
    BM25Index.build(texts, Bm25Config()).save(build / "bm25")
    return build


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "snapshots")


def test_a_symlinked_shard_fails_verify_promote_and_fetch(store, tmp_path):
    build = make_build(tmp_path, 1)
    version = store.publish(build, manifest_for(build))
    assert store.verify(INDEX, version).ok
    shard = Path(store.root) / INDEX / version / "dense" / "shard-00000.faiss"
    link_outside(shard, tmp_path / "outside" / "shard.faiss")  # same bytes: the checksum alone would pass

    report = store.verify(INDEX, version)
    assert not report.ok
    assert any("symbolic link" in p and "dense/shard-00000.faiss" in p for p in report.problems), report.problems
    with pytest.raises(VerificationError, match="symbolic link"):
        store.promote(INDEX, version, "production")
    with pytest.raises(VerificationError):
        store.fetch(INDEX, version)
    assert [(v.version, v.complete) for v in store.versions(INDEX)] == [(version, False)]


def test_a_version_directory_that_is_a_symlink_is_refused(store, tmp_path):
    build = make_build(tmp_path, 1)
    version = store.publish(build, manifest_for(build))
    vdir = Path(store.root) / INDEX / version
    outside = tmp_path / "outside" / version
    shutil.copytree(vdir, outside)
    writable(vdir.parent)
    store.backend.delete_prefix(f"{INDEX}/{version}")
    vdir.symlink_to(outside, target_is_directory=True)

    report = store.verify(INDEX, version)
    assert not report.ok and any("symbolic link" in p for p in report.problems), report.problems
    with pytest.raises(VerificationError, match="symbolic link"):
        store.set_alias(INDEX, "production", version)
    with pytest.raises(VerificationError):
        store.fetch(INDEX, version)
    assert [(v.version, v.complete) for v in store.versions(INDEX)] == [(version, False)]
    assert store.aliases(INDEX) == {}


def test_the_loader_refuses_symlinks_and_serves_regular_files(store, tmp_path):
    build = servable_build(tmp_path, TEXTS)
    manifest = build_manifest(build, index_name="demo", spec={"name": "demo"}, model={"name": "none"},
                              corpus_hash="c0ffee", index={"bm25": {}}, metrics={})
    version = store.publish(build, manifest)
    path = store.fetch("demo", version)
    snap = open_snapshot(path, store.manifest("demo", version))
    assert snap.modes == ("bm25",)
    assert snap.searcher.search("aspirin fever", k=1, mode="bm25", acl=UNRESTRICTED)[0].doc_id == "d0"

    # The whole version directory as a link (to a perfect copy): refused by the loader too.
    vlink = tmp_path / "vlink"
    vlink.symlink_to(path, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        open_snapshot(vlink, store.manifest("demo", version))

    # One data file swapped for a link to a file outside the root, e.g. after verification.
    scores = next(p for p in (path / "bm25").iterdir() if p.suffix == ".npy")
    link_outside(scores, tmp_path / "outside" / scores.name)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        open_snapshot(path, store.manifest("demo", version))


def test_pinned_tree_detects_a_file_replaced_after_the_check(tmp_path):
    top = tmp_path / "snap"
    (top / "dense").mkdir(parents=True)
    (top / "dense" / "a.bin").write_bytes(b"a" * 100)
    (top / "manifest.json").write_text("{}")
    manifest = {"files": [{"path": "dense/a.bin", "size": 100}]}

    pinned = pin_tree(top, manifest)
    try:
        pinned.check_unchanged()  # nothing moved: fine
        os.replace(top / "manifest.json", tmp_path / "elsewhere.json")
        (top / "dense" / "b.bin").write_bytes(b"a" * 100)
        os.replace(top / "dense" / "b.bin", top / "dense" / "a.bin")  # same name, size and content; new file
        with pytest.raises(UnsafePathError, match="changed while"):
            pinned.check_unchanged()
    finally:
        pinned.close()

    # A size that disagrees with the manifest is refused before anything is opened by name.
    with pytest.raises(UnsafePathError, match="size"):
        pin_tree(top, {"files": [{"path": "dense/a.bin", "size": 99}]}).close()
    (top / "dense" / "c.bin").symlink_to(top / "dense" / "a.bin")  # even a link to a file inside the tree
    with pytest.raises(UnsafePathError, match="symbolic link"):
        pin_tree(top, manifest).close()
