"""Alias updates are serialized: concurrent promotes and rollbacks lose no history entry (local
root: a file lock per index; S3: conditional writes against a real S3 API server)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from corpusforge.snapshots import SnapshotStore
from tests.snapshots import test_publish, test_publish_s3

N = 20


def publish_versions(store: SnapshotStore, tmp_path: Path, builder, n: int) -> list[str]:
    versions = []
    for seed in range(n):
        build = builder.make_build(tmp_path / f"b{seed}", seed)
        versions.append(store.publish(build, builder.manifest_for(build)))
    return versions


def concurrently(func, args: list) -> list[BaseException]:
    """Run ``func(arg)`` for every arg in its own thread, all released at once; the errors."""
    gate, errors = threading.Barrier(len(args)), []

    def run(arg):
        gate.wait()
        try:
            func(arg)
        except BaseException as exc:  # noqa: BLE001 -- reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(a,)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


def check_concurrent_promotes(store: SnapshotStore, index: str, versions: list[str]) -> None:
    first, rest = versions[0], versions[1:]
    store.set_alias(index, "production", first)
    assert concurrently(lambda v: store.promote(index, v, "production"), rest) == []
    record = store.alias_record(index, "production")
    history = [h["version"] for h in record["history"]]
    # Every promote is on the record exactly once: the first version, then each replaced one.
    assert len(history) == len(rest)
    assert sorted(history + [record["version"]]) == sorted(versions)
    assert history[0] == first
    # ...so rollback walks back through all of them.
    for expected in reversed(history[-3:]):
        assert store.rollback(index, "production") == expected


def test_concurrent_promotes_keep_every_history_entry_locally(tmp_path):
    store = SnapshotStore(tmp_path / "snapshots")
    versions = publish_versions(store, tmp_path, test_publish, N + 1)
    check_concurrent_promotes(store, test_publish.INDEX, versions)
    # The lock lives with the aliases, in the snapshot root (shared by every workspace using it).
    assert (tmp_path / "snapshots" / test_publish.INDEX / "aliases" / ".lock").is_file()
    assert set(store.aliases(test_publish.INDEX)) == {"production"}


def test_concurrent_promotes_keep_every_history_entry_on_s3(s3_server, s3_bucket, tmp_path):
    store = SnapshotStore(f"s3://{s3_bucket}/{test_publish_s3.PREFIX}", endpoint_url=s3_server["endpoint_url"])
    versions = publish_versions(store, tmp_path, test_publish_s3, N + 1)
    check_concurrent_promotes(store, test_publish_s3.INDEX, versions)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_rollbacks_each_step_back_once(where, request, tmp_path):
    if where == "local":
        store, builder = SnapshotStore(tmp_path / "snapshots"), test_publish
    else:
        server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        store, builder = SnapshotStore(f"s3://{bucket}/p", endpoint_url=server["endpoint_url"]), test_publish_s3
    versions = publish_versions(store, tmp_path, builder, 8)
    for v in versions:
        store.promote(builder.INDEX, v, "production")
    results: list[str] = []
    assert concurrently(lambda _: results.append(store.rollback(builder.INDEX, "production")), range(4)) == []
    # Four rollbacks, each one step further back: never two onto the same version.
    assert sorted(results) == versions[3:7]
    assert store.resolve(builder.INDEX, "production") == versions[3]
    assert [h["version"] for h in store.alias_record(builder.INDEX, "production")["history"]] == versions[:3]
