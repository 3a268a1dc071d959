"""`corpusforge snapshots gc`: leftovers of interrupted publishes and old unaliased versions are
removed (a dry run unless --yes); aliased versions, an alias's recent history, the newest N and
publishes possibly still running are kept. Local root and S3 (a real moto server), real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from corpusforge.snapshots import ManifestError, SnapshotStore
from tests.snapshots import test_publish, test_publish_s3

ROOT = Path(__file__).resolve().parents[2]
INDEX = test_publish.INDEX
HOURS_AGO = time.time() - 2 * 3600


def cli(*args) -> str:
    """Run ``corpusforge snapshots gc ARGS``; its output (the console writes to stderr)."""
    env = {**os.environ, "COLUMNS": "250"}  # one table row per line, names unwrapped
    out = subprocess.run([sys.executable, "-m", "corpusforge.cli", "snapshots", "gc", *map(str, args)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def age(path: Path, when: float) -> None:
    """Set the mtime of a tree (directories included) to ``when``."""
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            os.utime(Path(dirpath) / name, (when, when))
        os.utime(dirpath, (when, when))


def publish_seeds(store: SnapshotStore, tmp_path: Path, builder, seeds) -> list[str]:
    out = []
    for seed in seeds:
        build = builder.make_build(tmp_path / f"b{seed}", seed)
        out.append(store.publish(build, builder.manifest_for(build)))
    return out


def interrupted_publish(store: SnapshotStore, tmp_path: Path) -> str:
    """A local publish that fails halfway (a build file changed after its manifest): its leftover."""
    build = test_publish.make_build(tmp_path / "broken", 99)
    manifest = test_publish.manifest_for(build)
    test_publish.flip_byte(build / "chunks" / "part-00000.parquet")
    with pytest.raises(ManifestError):
        store.publish(build, manifest)
    (leftover,) = store.incomplete(INDEX)
    return leftover.name


def test_gc_removes_old_leftovers_keeps_young_ones_and_is_a_dry_run_without_yes(tmp_path):
    root = tmp_path / "snapshots"
    store = SnapshotStore(root)
    (good,) = publish_seeds(store, tmp_path, test_publish, [1])
    store.set_alias(INDEX, "production", good)
    staged = interrupted_publish(store, tmp_path)
    assert staged.startswith(".tmp-")
    age(root / INDEX / staged, HOURS_AGO)
    unfinished = root / INDEX / "20200101T000000.000000Z-deadbeef"  # a version without manifest
    (unfinished / "dense").mkdir(parents=True)
    (unfinished / "dense" / "shard-00000.faiss").write_bytes(b"partial")
    age(unfinished, HOURS_AGO)
    running = root / INDEX / ".tmp-20300101T000000.000000Z-0badc0de"  # a publish that just started
    running.mkdir()
    args = ["--root", root, "--index", INDEX]

    out = cli(*args)
    assert "dry run" in out and "2 would be removed" in out
    for name in (staged, unfinished.name, running.name):
        assert name in out
        assert (root / INDEX / name).exists()  # a dry run removes nothing

    out = cli(*args, "--yes")
    assert "removed 2" in out
    assert not (root / INDEX / staged).exists() and not unfinished.exists()
    assert running.is_dir()  # younger than the grace period: may be a publish in progress
    assert [i.name for i in store.incomplete(INDEX)] == [running.name]
    assert store.verify(INDEX, good).ok and store.resolve(INDEX, "production") == good

    cli(*args, "--yes", "--grace", "0")
    assert store.incomplete(INDEX) == []
    assert sorted(p.name for p in (root / INDEX).iterdir()) == sorted(["aliases", good])


def test_gc_keep_removes_only_old_versions_no_alias_needs(tmp_path):
    root = tmp_path / "snapshots"
    store = SnapshotStore(root)
    v = publish_seeds(store, tmp_path, test_publish, range(8))
    for version in v[:6]:
        store.promote(INDEX, version, "production")  # production: v5, history v0..v4
    store.set_alias(INDEX, "staging", v[1])

    # The default protects an alias's last 5 history entries: only the newest two could go.
    report = store.gc(INDEX, keep=0)
    assert report.dry_run and [i.name for i in report.removed] == [v[6], v[7]]
    report = store.gc(INDEX, keep=2, history=2)
    assert [i.name for i in report.removed] == [v[0], v[2]]
    reasons = {i.name: i.reason for i in report.kept}
    assert "staging" in reasons[v[1]] and "history" in reasons[v[3]] and "history" in reasons[v[4]]
    assert "production" in reasons[v[5]] and "newest" in reasons[v[6]] and "newest" in reasons[v[7]]
    assert len(store.versions(INDEX)) == 8  # that was a dry run

    out = cli("--root", root, "--index", INDEX, "--keep", "2", "--history", "2", "--yes")
    assert "removed 2" in out
    assert [i.version for i in store.versions(INDEX)] == [v[1], v[3], v[4], v[5], v[6], v[7]]
    assert all(store.verify(INDEX, version).ok for version in (v[1], v[3], v[4], v[5], v[6], v[7]))
    assert store.incomplete(INDEX) == []  # removed at once, no half-deleted version left behind
    assert store.rollback(INDEX, "production") == v[4]
    assert store.rollback(INDEX, "production") == v[3]
    assert store.aliases(INDEX) == {"production": v[3], "staging": v[1]}


def test_gc_removes_a_linked_version_but_not_what_it_points_at(tmp_path):
    root = tmp_path / "snapshots"
    store = SnapshotStore(root)
    old, new = publish_seeds(store, tmp_path, test_publish, [1, 2])
    store.set_alias(INDEX, "production", new)
    outside = tmp_path / "outside" / old
    shutil.copytree(root / INDEX / old, outside)
    store.backend.delete_prefix(f"{INDEX}/{old}")
    (root / INDEX / old).symlink_to(outside, target_is_directory=True)

    report = store.gc(INDEX, keep=1, dry_run=False)
    assert [i.name for i in report.removed] == [old]
    assert not (root / INDEX / old).is_symlink() and (outside / "manifest.json").is_file()
    assert [i.version for i in store.versions(INDEX)] == [new]


def test_gc_on_s3(s3_server, s3_bucket, tmp_path):
    endpoint = s3_server["endpoint_url"]
    uri = f"s3://{s3_bucket}/{test_publish_s3.PREFIX}"
    store = SnapshotStore(uri, endpoint_url=endpoint)
    v = publish_seeds(store, tmp_path, test_publish_s3, range(4))
    store.promote(INDEX, v[0], "production")
    store.promote(INDEX, v[1], "production")  # production: v1, history v0
    flaky = test_publish_s3.UploadsFailAfter(boto3.client("s3", endpoint_url=endpoint), n=2)
    build = test_publish_s3.make_build(tmp_path / "broken", 9)
    with pytest.raises(ConnectionError):
        SnapshotStore(uri, client=flaky).publish(build, test_publish_s3.manifest_for(build))
    (partial,) = [i.name for i in store.incomplete(INDEX)]
    args = ["--root", uri, "--index", INDEX, "--endpoint-url", endpoint]

    out = cli(*args, "--keep", "1", "--history", "1")
    assert "dry run" in out and "1 would be removed" in out and v[2] in out
    assert partial in out and "grace" in out  # just written: may still be running
    assert len(store.versions(INDEX)) == 4 and store.incomplete(INDEX) != []

    out = cli(*args, "--keep", "1", "--history", "1", "--grace", "0", "--yes")
    assert "removed 2" in out
    s3 = boto3.client("s3", endpoint_url=endpoint)
    assert test_publish_s3.keys(s3, s3_bucket, f"{test_publish_s3.PREFIX}/{INDEX}/{partial}/") == []
    assert test_publish_s3.keys(s3, s3_bucket, f"{test_publish_s3.PREFIX}/{INDEX}/{v[2]}/") == []
    assert [i.version for i in store.versions(INDEX)] == [v[0], v[1], v[3]]
    assert store.incomplete(INDEX) == []
    assert store.rollback(INDEX, "production") == v[0]
