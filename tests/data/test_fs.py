"""Tests of the filesystem layer on local disk and on a real S3 API server (moto)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import boto3
import pytest

from corpusforge.data import fs


def _tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b.jsonl").write_bytes(b'{"a": 1}\n{"a": 2}\n')
    (root / "a.txt").write_bytes(b"alpha")
    (root / "sub" / "c.TXT").write_bytes(b"gamma!")
    (root / "sub" / "deeper" / "d.md").write_bytes(b"# d")
    (root / ".hidden" / "e.txt").write_bytes(b"hidden")
    (root / ".tmp-part.txt").write_bytes(b"temp")


def test_list_files_local_recursive_sorted_and_filtered(tmp_path):
    _tree(tmp_path)
    refs = fs.list_files(str(tmp_path))
    assert [r.relpath for r in refs] == ["a.txt", "b.jsonl", "sub/c.TXT", "sub/deeper/d.md"]
    assert refs[0].uri == str(tmp_path / "a.txt")
    assert refs[0].size == 5 and refs[2].size == 6
    assert all(isinstance(r.mtime_ns, int) and r.mtime_ns > 0 for r in refs)
    # Globs match file names case-insensitively; a pattern with '/' matches the relative path.
    assert [r.relpath for r in fs.list_files(str(tmp_path), ["*.txt"])] == ["a.txt", "sub/c.TXT"]
    assert [r.relpath for r in fs.list_files(str(tmp_path), ["sub/*/*.md"])] == ["sub/deeper/d.md"]
    assert fs.list_files(str(tmp_path), ["*.pdf"]) == []


def test_list_files_single_file_and_missing(tmp_path):
    _tree(tmp_path)
    one = fs.list_files(str(tmp_path / "b.jsonl"), ["*.txt"])
    assert [(r.relpath, r.size) for r in one] == [("b.jsonl", 18)]
    assert fs.list_files(f"file://{tmp_path}/a.txt")[0].uri == str(tmp_path / "a.txt")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        fs.list_files(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unsupported URI scheme 'gs'"):
        fs.list_files("gs://bucket/x")


def test_read_open_exists_write_local(tmp_path):
    _tree(tmp_path)
    assert fs.read_bytes(str(tmp_path / "a.txt")) == b"alpha"
    with fs.open_binary(str(tmp_path / "b.jsonl")) as f:
        assert list(f) == [b'{"a": 1}\n', b'{"a": 2}\n']
    (tmp_path / "z.jsonl.gz").write_bytes(gzip.compress(b"line1\nline2\n"))
    with fs.open_binary(str(tmp_path / "z.jsonl.gz"), decompress=True) as f:
        assert f.read() == b"line1\nline2\n"
    assert fs.read_bytes(str(tmp_path / "z.jsonl.gz")).startswith(b"\x1f\x8b")  # raw by default
    assert fs.exists(str(tmp_path)) and fs.exists(str(tmp_path / "a.txt"))
    assert not fs.exists(str(tmp_path / "missing"))
    assert fs.is_file(str(tmp_path / "a.txt")) and not fs.is_file(str(tmp_path))
    target = tmp_path / "new" / "dir" / "f.bin"
    fs.write_bytes(str(target), b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    with pytest.raises(FileNotFoundError):
        fs.read_bytes(str(tmp_path / "missing"))
    assert fs.join(str(tmp_path), "qrels", "test.tsv") == str(tmp_path / "qrels" / "test.tsv")
    assert fs.join("s3://b/p/", "qrels", "test.tsv") == "s3://b/p/qrels/test.tsv"


def test_fingerprint_changes_with_listing_only(tmp_path):
    _tree(tmp_path)
    root = str(tmp_path)
    fp = fs.fingerprint(root)
    assert fp == fs.fingerprint(root) and len(fp) == 32
    (tmp_path / ".hidden" / "e.txt").write_bytes(b"hidden files do not count")
    assert fs.fingerprint(root) == fp
    (tmp_path / "a.txt").write_bytes(b"alpha, longer")  # resized
    fp2 = fs.fingerprint(root)
    assert fp2 != fp
    os.utime(tmp_path / "a.txt", ns=(1_000_000_000, 1_000_000_000))  # touched
    fp3 = fs.fingerprint(root)
    assert fp3 != fp2
    (tmp_path / "sub" / "new.txt").write_bytes(b"")  # added
    assert fs.fingerprint(root) != fp3
    assert fs.fingerprint(root, patterns=["*.jsonl"]) != fs.fingerprint(root)


def _upload(endpoint: str, bucket: str, objects: dict[str, bytes]) -> None:
    client = boto3.client("s3", endpoint_url=endpoint)
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


def test_s3_list_read_and_fingerprint(s3_server, s3_bucket):
    ep = s3_server["endpoint_url"]
    _upload(ep, s3_bucket, {
        "corpus/b.jsonl": b'{"a": 1}\n{"a": 2}\n',
        "corpus/a.txt": b"alpha",
        "corpus/sub/c.txt": b"gamma!",
        "corpus/.hidden/x.txt": b"skip",
        "corpusother/z.txt": b"not under the prefix",
    })
    root = f"s3://{s3_bucket}/corpus"
    refs = fs.list_files(root, endpoint_url=ep)
    assert [(r.relpath, r.size) for r in refs] == [("a.txt", 5), ("b.jsonl", 18), ("sub/c.txt", 6)]
    assert refs[2].uri == f"s3://{s3_bucket}/corpus/sub/c.txt"
    assert [r.relpath for r in fs.list_files(root + "/", ["*.txt"], endpoint_url=ep)] == ["a.txt", "sub/c.txt"]
    assert [r.relpath for r in fs.list_files(f"{root}/b.jsonl", endpoint_url=ep)] == ["b.jsonl"]
    with fs.open_binary(f"{root}/b.jsonl", endpoint_url=ep) as f:
        assert list(f) == [b'{"a": 1}\n', b'{"a": 2}\n']
    assert fs.read_bytes(f"{root}/sub/c.txt", endpoint_url=ep) == b"gamma!"
    assert fs.exists(root, ep) and fs.exists(f"{root}/a.txt", ep)
    assert not fs.exists(f"s3://{s3_bucket}/nothing", ep)
    assert fs.is_file(f"{root}/a.txt", ep) and not fs.is_file(root, ep)
    with pytest.raises(FileNotFoundError):
        fs.list_files(f"s3://{s3_bucket}/nothing", endpoint_url=ep)

    fp = fs.fingerprint(root, endpoint_url=ep)
    assert fp == fs.fingerprint(root, endpoint_url=ep)
    _upload(ep, s3_bucket, {"corpus/sub/new.txt": b"new"})
    assert fs.fingerprint(root, endpoint_url=ep) != fp

    fs.write_bytes(f"s3://{s3_bucket}/out/x.bin", b"xyz", endpoint_url=ep)
    body = boto3.client("s3", endpoint_url=ep).get_object(Bucket=s3_bucket, Key="out/x.bin")["Body"].read()
    assert body == b"xyz"


def test_s3_endpoint_from_environment(s3_server, s3_bucket, monkeypatch):
    ep = s3_server["endpoint_url"]
    _upload(ep, s3_bucket, {"p/a.txt": b"from env"})
    monkeypatch.setenv("AWS_ENDPOINT_URL", ep)
    assert fs.read_bytes(f"s3://{s3_bucket}/p/a.txt") == b"from env"
    assert [r.relpath for r in fs.list_files(f"s3://{s3_bucket}/p")] == ["a.txt"]
