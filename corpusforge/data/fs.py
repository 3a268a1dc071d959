"""One filesystem layer over local paths and ``s3://bucket/prefix`` URIs, built on `pyarrow.fs`.

Every stage that reads a source (or a BEIR folder) goes through this module, so the same code
reads a local directory, a MinIO bucket or AWS S3. Local paths may be plain paths or
``file://`` URIs. S3 credentials come from the usual AWS environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, profiles); the endpoint comes from an
explicit ``endpoint_url`` argument, else ``AWS_ENDPOINT_URL``, else AWS itself.

Listings are recursive and sorted, so every consumer sees files in the same order on every run.
Names with a hidden component (``.git/``, ``.~lock.x.md``, a writer's ``.part`` temp file) are
left out of directory listings; naming such a file directly still works.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import posixpath
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

_BUFFER = 1 << 20  # 1 MiB read buffer: few syscalls / S3 range requests, flat memory


@dataclass(frozen=True)
class FileRef:
    """One file found by `list_files`.

    Attributes:
        uri: the file's full URI (a local absolute path, or ``s3://bucket/key``).
        relpath: the path relative to the listed root, with ``/`` separators (the file name when
            the root is the file itself).
        size: size in bytes.
        mtime_ns: last modification time in nanoseconds since the epoch (None when unknown).
    """

    uri: str
    relpath: str
    size: int
    mtime_ns: int | None


def is_s3(uri: str) -> bool:
    """Whether `uri` names an S3 object or prefix.

    Args:
        uri: a local path or URI.

    Returns:
        True for ``s3://`` (and ``s3a://``) URIs.
    """
    return uri.startswith(("s3://", "s3a://"))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI.

    Args:
        uri: the base (local path or ``s3://bucket/prefix``).
        *parts: relative parts, ``/``-separated.

    Returns:
        The joined path or URI, in the same style as `uri`.
    """
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(_local_path(uri)).joinpath(*parts))


def _local_path(uri: str) -> str:
    if uri.startswith("file://"):
        return unquote(urlparse(uri).path)
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise ValueError(f"{uri}: unsupported URI scheme '{scheme}' (use a local path or s3://)")
    return os.path.abspath(os.path.expanduser(uri))


def _endpoint(endpoint_url: str | None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


# S3FileSystem objects are cheap to share and thread-safe; one per endpoint and credential set.
_S3_CACHE: dict[tuple, pafs.S3FileSystem] = {}
_S3_LOCK = threading.Lock()


def _s3_filesystem(endpoint_url: str | None) -> pafs.S3FileSystem:
    endpoint = _endpoint(endpoint_url)
    region = _region()
    # The key id is part of the cache key so a changed environment is never served stale creds.
    key = (endpoint, region, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    with _S3_LOCK:
        fs = _S3_CACHE.get(key)
        if fs is None:
            kwargs: dict = {"region": region}
            if endpoint:
                parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
                kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
                kwargs["scheme"] = parsed.scheme
            fs = pafs.S3FileSystem(**kwargs)
            _S3_CACHE[key] = fs
        return fs


def resolve(uri: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path for a local path or URI.

    Args:
        uri: a local path, ``file://`` URI or ``s3://bucket/key`` URI.
        endpoint_url: S3 endpoint (default: ``AWS_ENDPOINT_URL``, else AWS).

    Returns:
        ``(filesystem, path)``; for S3 the path is ``bucket/key``.

    Raises:
        ValueError: an unsupported scheme (the message names it).
    """
    if is_s3(uri):
        path = uri.split("://", 1)[1].rstrip("/")
        if not path:
            raise ValueError(f"{uri}: an S3 URI needs a bucket name")
        return _s3_filesystem(endpoint_url), path
    return pafs.LocalFileSystem(), _local_path(uri)


def _to_uri(uri: str, path: str) -> str:
    """Rebuild a URI in the caller's style from an in-filesystem path."""
    if is_s3(uri):
        return f"{uri.split('://', 1)[0]}://{path}"
    return path


def _matches(relpath: str, patterns: Iterable[str] | None) -> bool:
    """Case-insensitive glob match: on the file name, or on the relative path for patterns with '/'."""
    if patterns is None:
        return True
    name = relpath.rsplit("/", 1)[-1].lower()
    rel = relpath.lower()
    for pattern in patterns:
        p = pattern.lower()
        if fnmatch.fnmatchcase(rel if "/" in p else name, p):
            return True
    return False


def list_files(uri: str, patterns: Iterable[str] | None = None,
               endpoint_url: str | None = None) -> list[FileRef]:
    """All files under a directory or prefix (recursively), or the one file `uri` names.

    Args:
        uri: a local path or ``s3://bucket/prefix``.
        patterns: glob patterns (``*.jsonl``); matched case-insensitively against the file name,
            or against the relative path when a pattern contains ``/``. None keeps every file.
        endpoint_url: S3 endpoint (default: ``AWS_ENDPOINT_URL``, else AWS).

    Returns:
        The matching files sorted by relative path. A single file named directly is returned
        whatever the patterns say.

    Raises:
        FileNotFoundError: nothing exists at `uri`.
    """
    patterns = list(patterns) if patterns is not None else None
    fs, path = resolve(uri, endpoint_url)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [FileRef(_to_uri(uri, info.path), posixpath.basename(info.path), info.size, info.mtime_ns)]
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such file or directory")
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    root = info.path.rstrip("/")
    refs = []
    for entry in fs.get_file_info(selector):
        if entry.type != pafs.FileType.File:
            continue
        rel = entry.path[len(root):].lstrip("/").replace(os.sep, "/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # hidden files and folders, writers' temp files
        if _matches(rel, patterns):
            refs.append(FileRef(_to_uri(uri, entry.path), rel, entry.size, entry.mtime_ns))
    refs.sort(key=lambda r: r.relpath)
    return refs


class SourceUnreachableError(ConnectionError):
    """An S3 source that could not be listed: endpoint down or unknown, no credentials, access denied, ..."""


def check_source(uri: str, endpoint_url: str | None = None, list_remote: bool = False,
                 timeout_s: float = 5.0) -> str:
    """Check, before any stage reads it, that a source is there.

    A local path must exist. An S3 source is contacted only with `list_remote`: one or two
    one-key listings with short timeouts and no retries, so a wrong endpoint or missing
    credentials fail in seconds rather than after the SDK's retries.

    Args:
        uri: the source (local path, ``file://`` or ``s3://bucket/prefix``).
        endpoint_url: S3 endpoint (default: ``AWS_ENDPOINT_URL``, else AWS).
        list_remote: list an S3 source (else S3 sources are not checked).
        timeout_s: connect and read timeout of each S3 request, in seconds.

    Returns:
        What was checked, for the user: ``"local file"``, ``"local directory"``,
        ``"S3 object"``, ``"S3 prefix"`` or ``"S3 (not contacted)"``.

    Raises:
        FileNotFoundError: nothing at the local path, or no object at or under the S3 prefix.
        SourceUnreachableError: the S3 listing failed (the message carries the S3 client's reason).
    """
    if not is_s3(uri):
        path = _local_path(uri)
        if os.path.isdir(path):
            return "local directory"
        if os.path.exists(path):
            return "local file"
        raise FileNotFoundError(f"source {uri}: no such file or directory")
    if not list_remote:
        return "S3 (not contacted)"
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = uri.split("://", 1)[1].rstrip("/").partition("/")
    client = boto3.client("s3", endpoint_url=_endpoint(endpoint_url), region_name=_region(),
                          config=Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                                        retries={"max_attempts": 1, "mode": "standard"}))
    try:
        # An exact key sorts before every longer key it prefixes, so one key tells whether `key`
        # is an object; otherwise `key/` must have something under it ("key-2" is no match).
        first = client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("Contents", [])
        if first and (not key or first[0]["Key"] == key):
            return "S3 object" if key else "S3 prefix"
        if key and client.list_objects_v2(Bucket=bucket, Prefix=key + "/", MaxKeys=1).get("KeyCount"):
            return "S3 prefix"
    except (BotoCoreError, ClientError) as exc:
        raise SourceUnreachableError(f"source {uri}: {exc}") from exc
    raise FileNotFoundError(f"source {uri}: no object at or under this prefix")


def exists(uri: str, endpoint_url: str | None = None) -> bool:
    """Whether a file, directory or non-empty prefix exists at `uri`.

    Args:
        uri: a local path or S3 URI.
        endpoint_url: S3 endpoint (default: ``AWS_ENDPOINT_URL``, else AWS).

    Returns:
        True when something is there.
    """
    fs, path = resolve(uri, endpoint_url)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(uri: str, endpoint_url: str | None = None) -> bool:
    """Whether `uri` names a single file (an object, for S3).

    Args:
        uri: a local path or S3 URI.
        endpoint_url: S3 endpoint (default: ``AWS_ENDPOINT_URL``, else AWS).

    Returns:
        True for a file, False for a directory, prefix or nothing.
    """
    fs, path = resolve(uri, endpoint_url)
    return fs.get_file_info(path).type == pafs.FileType.File


def open_binary(uri: str, endpoint_url: str | None = None, decompress: bool = False) -> io.BufferedReader:
    """Open a file for streamed binary reading.

    Args:
        uri: a local path or S3 URI naming a file.
        endpoint_url: S3 endpoint (default: ``AWS_ENDPOINT_URL``, else AWS).
        decompress: decompress transparently by extension (``.gz``, ``.bz2``, ``.zst``, ...).

    Returns:
        A buffered binary stream (supports ``read``, ``readline`` and line iteration); use it
        as a context manager. Memory use is one buffer, whatever the file size.

    Raises:
        FileNotFoundError: no such file.
        PermissionError: the file cannot be read.
    """
    fs, path = resolve(uri, endpoint_url)
    raw = fs.open_input_stream(path, compression="detect" if decompress else None)
    return io.BufferedReader(raw, buffer_size=_BUFFER)


def open_input_file(uri: str, endpoint_url: str | None = None):
    """Open a file for random access (seek / read_at), e.g. for Parquet footers.

    Args:
        uri: a local path or S3 URI naming a file.
        endpoint_url: S3 endpoint (default: ``AWS_ENDPOINT_URL``, else AWS).

    Returns:
        A seekable ``pyarrow.NativeFile``; use it as a context manager.
    """
    fs, path = resolve(uri, endpoint_url)
    return fs.open_input_file(path)


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    """Read a whole file into memory (for small files: PDFs, HTML pages, qrels).

    Args:
        uri: a local path or S3 URI naming a file.
        endpoint_url: S3 endpoint (default: ``AWS_ENDPOINT_URL``, else AWS).

    Returns:
        The file's bytes.
    """
    with open_binary(uri, endpoint_url) as f:
        return f.read()


def write_bytes(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Write a whole file, creating parent directories (local) as needed.

    Args:
        uri: a local path or S3 URI.
        data: the content.
        endpoint_url: S3 endpoint (default: ``AWS_ENDPOINT_URL``, else AWS).
    """
    fs, path = resolve(uri, endpoint_url)
    if not is_s3(uri):
        fs.create_dir(posixpath.dirname(path) or "/", recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)


def fingerprint(uri: str, endpoint_url: str | None = None,
                patterns: Iterable[str] | None = None) -> str:
    """A cheap fingerprint of a source, from its listing alone (no file is read).

    It changes when a file is added, removed, renamed, resized or touched, or when the source
    location changes, so the runner can skip stages whose source did not change. S3 reports
    modification times in whole seconds, so an object rewritten with the same size within the
    same second is not noticed (ETags are not exposed by `pyarrow.fs`).

    Args:
        uri: a local path or S3 URI (file, directory or prefix).
        endpoint_url: S3 endpoint (default: ``AWS_ENDPOINT_URL``, else AWS).
        patterns: restrict to files matching these globs (as in `list_files`).

    Returns:
        A 32-character hex digest.
    """
    listing = [[r.relpath, r.size, r.mtime_ns] for r in list_files(uri, patterns, endpoint_url)]
    blob = json.dumps([uri.rstrip("/"), listing], separators=(",", ":"))
    return hashlib.blake2b(blob.encode("utf-8"), digest_size=16).hexdigest()


def changed_sources(specs: Mapping[str, str | Path], previous: Mapping[str, str]
                    ) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Which specs' sources changed since `previous` (a sensor cursor), by `fs.fingerprint`.

    A spec first seen (absent from `previous`) is recorded without counting as changed, so
    turning a watch on does not rebuild every corpus at once (the nightly schedule does that).

    Args:
        specs: ``{name: spec path}``.
        previous: ``{name: source fingerprint}`` from the last look.

    Returns:
        (names whose source changed, ``{name: fingerprint}`` now, ``{name: error}`` for specs or
        sources that could not be read; those keep their previous fingerprint).
    """
    from corpusforge.spec import load_spec  # spec imports this module

    changed, current, errors = [], {}, {}
    for name, path in specs.items():
        try:
            spec = load_spec(path)
            current[name] = fingerprint(spec.source_uri, endpoint_url=spec.source.s3_endpoint_url)
        except Exception as exc:  # noqa: BLE001 - one unreadable source must not stop the others
            errors[name] = f"{type(exc).__name__}: {exc}"
            if name in previous:
                current[name] = previous[name]
            continue
        if name in previous and previous[name] != current[name]:
            changed.append(name)
    return changed, current, errors
