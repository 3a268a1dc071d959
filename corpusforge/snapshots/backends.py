"""Storage backends for snapshots: a local directory or an S3 prefix behind one small interface.

Keys are relative posix paths under the store root (``scifact/<version>/dense/dense.json``).
The snapshot logic (:mod:`corpusforge.snapshots.store`) is written once against
:class:`Backend`; the only backend-specific step is :meth:`Backend.put_tree`, the commit of a
whole snapshot, because "appear all at once" is a directory rename on a disk and "manifest last"
on S3.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import stat
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

from corpusforge.snapshots.manifest import HASH_CHUNK, MANIFEST_NAME, HashingReader
from corpusforge.snapshots.nofollow import UnsafePathError, open_beneath, unsafe_entries

READ_ONLY_FILE = 0o444
READ_ONLY_DIR = 0o555
LOCK_NAME = ".lock"  # LocalBackend.update_bytes: one lock file per directory of updated keys
# S3Backend.update_bytes: retries of a conditional write that lost a race, with "full jitter"
# backoff (a random delay up to base * 2**attempt, capped) so that racing writers spread out.
CAS_ATTEMPTS = 60
CAS_BASE_DELAY_S = 0.02
CAS_MAX_DELAY_S = 1.0

Update = Callable[[bytes | None], bytes | None]


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object (a file on disk, an object on S3).

    Attributes:
        key: the key relative to the store root (posix).
        size: size in bytes.
        mtime: last modification, seconds since the epoch.
    """

    key: str
    size: int
    mtime: float


@dataclass(frozen=True)
class FileEntry:
    """A file to publish: its path in the build and what the manifest says about it."""

    path: str
    size: int
    sha256: str


class Backend(ABC):
    """Key/value storage of snapshot files.

    Implementations: :class:`LocalBackend` and :class:`S3Backend`. Every method takes keys
    relative to the backend's root; ``prefix`` arguments name a "directory" without trailing
    slash ("" is the root).
    """

    root: str

    @abstractmethod
    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object under ``prefix``, recursively.

        Args:
            prefix: a directory-like key ("" for everything).

        Returns:
            The objects, keys relative to the root.
        """

    @abstractmethod
    def children(self, prefix: str) -> list[str]:
        """Names of the immediate sub-"directories" of ``prefix`` (not files).

        Args:
            prefix: a directory-like key ("" for the root).

        Returns:
            Sorted names.
        """

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the object ``key`` exists."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The whole content of a (small) object.

        Raises:
            FileNotFoundError: when it does not exist.
        """

    @abstractmethod
    def iter_chunks(self, key: str, chunk_size: int = HASH_CHUNK) -> Iterator[bytes]:
        """Stream an object's content in chunks.

        Raises:
            FileNotFoundError: when it does not exist.
        """

    @abstractmethod
    def write_bytes(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        """Write a small object atomically: readers see the old content or the new, never a part.

        Args:
            key: the object key.
            data: the content.
            exclusive: create only; fail when the object already exists.

        Raises:
            FileExistsError: when ``exclusive`` and the object exists.
        """

    @abstractmethod
    def update_bytes(self, key: str, update: Update) -> bytes | None:
        """Read-modify-write a small object, serialized against every other ``update_bytes`` of it.

        ``update`` may be called more than once (when another writer got in first, it is called
        again with that writer's content), so it must not have side effects that cannot repeat;
        an exception it raises leaves the object unchanged and propagates.

        Args:
            key: the object key.
            update: ``f(current content or None when absent) -> new content``, or None to leave
                the object as it is.

        Returns:
            The content now stored (the current one when ``update`` returned None; None when the
            object is absent and stays so).

        Raises:
            TimeoutError: when concurrent writers kept winning for too long (S3).
        """

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete everything under ``prefix`` (read-only snapshot files included).

        Returns:
            The number of objects deleted.
        """

    @abstractmethod
    def delete_tree(self, prefix: str) -> int:
        """Delete a committed snapshot so that it stops being a version first, then disappears.

        The opposite of :meth:`put_tree`: locally one rename takes the whole directory out of
        sight before it is deleted; on S3 ``manifest.json`` goes first (the version is then
        unfinished, never resolvable), the rest after. Interrupted, it leaves an incomplete
        leftover, never a damaged version.

        Args:
            prefix: the version (``<index>/<version>``).

        Returns:
            The number of objects deleted.
        """

    def exclusive(self, prefix: str) -> ContextManager[None]:
        """A block during which no :meth:`update_bytes` of a key directly under ``prefix`` runs.

        Locally the same file lock ``update_bytes`` takes; on object stores a no-op (their
        updates are conditional writes, which take no lock).

        Args:
            prefix: the directory-like key of the updated objects (``<index>/aliases``).
        """
        return nullcontext()

    @abstractmethod
    def put_tree(self, src_dir: Path, files: Sequence[FileEntry], prefix: str, manifest: bytes) -> None:
        """Publish a build under ``prefix`` so that it becomes visible only once complete.

        Every file is hashed while it is copied and checked against its entry, so the stored
        bytes are the bytes the manifest describes. ``manifest`` is written last: a version
        without ``manifest.json`` is an unfinished publish.

        Args:
            src_dir: the local build directory.
            files: the files to copy, with their expected size and sha256.
            prefix: the target (``<index>/<version>``).
            manifest: the serialized manifest, stored as ``<prefix>/manifest.json``.

        Raises:
            FileExistsError: when anything already exists at ``prefix``.
            ManifestError: when a build file differs from its entry (the publish stops there).
        """

    @abstractmethod
    def download(self, key: str, dest: Path) -> None:
        """Copy an object into a local file (created, parents included)."""

    def local_path(self, prefix: str) -> Path | None:
        """The local directory holding ``prefix``, or None for remote backends."""
        return None

    def unsafe_entries(self, prefix: str) -> dict[str, str]:
        """Symbolic links and special files at, on the way to, or under ``prefix``.

        Object stores have neither: the default finds nothing.

        Args:
            prefix: a directory-like key.

        Returns:
            ``{key: what it is}``; empty when there are none.
        """
        return {}


def _fsync_dir(path: Path) -> None:
    # Makes a rename or a new directory entry durable; not every platform can open a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_writable(path: Path) -> None:
    """Undo the read-only bits under ``path`` so that it can be deleted."""
    for dirpath, _dirs, _files in os.walk(path):
        os.chmod(dirpath, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)


def make_read_only(path: Path) -> None:
    """chmod a directory tree read-only (files 0444, directories 0555), deepest first.

    Args:
        path: the top directory (itself included).
    """
    for dirpath, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.chmod(Path(dirpath) / name, READ_ONLY_FILE)
        os.chmod(dirpath, READ_ONLY_DIR)


def remove_tree(path: Path) -> None:
    """Delete a directory tree, read-only parts included; a missing path is fine.

    A symbolic link is removed itself: what it points at is never touched.
    """
    if path.is_symlink():
        path.unlink()
        return
    if not path.exists():
        return
    _make_writable(path)
    shutil.rmtree(path)


def copy_verified(src: Path, dst: Path, entry: FileEntry) -> None:
    """Copy one file, hashing it on the way, fsync it, and check it against its entry.

    Args:
        src: the source file.
        dst: the destination (must not exist).
        entry: the expected size and sha256.

    Raises:
        ManifestError: when the bytes read differ from the entry.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f, open(dst, "xb") as out:
        reader = HashingReader(f)
        shutil.copyfileobj(reader, out, HASH_CHUNK)
        out.flush()
        os.fsync(out.fileno())
    reader.check(entry.path, entry.size, entry.sha256)


class LocalBackend(Backend):
    """Snapshots in a local directory.

    Nothing below the root is read through a symbolic link: listings skip links and special files,
    and files are opened one path component at a time with ``O_NOFOLLOW``
    (:mod:`corpusforge.snapshots.nofollow`), so a link can never pass for a stored file;
    :meth:`unsafe_entries` reports them. The root itself may be a link.

    Args:
        root: the store root (created on first write).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.base = Path(root).expanduser().absolute()
        self.root = str(self.base)

    def _path(self, key: str) -> Path:
        return self.base / key if key else self.base

    def _behind_link(self, prefix: str) -> bool:
        """Whether a component of ``prefix`` below the root is a symbolic link."""
        path = self.base
        for part in [p for p in prefix.split("/") if p]:
            path = path / part
            if path.is_symlink():
                return True
        return False

    def list(self, prefix: str) -> list[ObjectInfo]:
        top = self._path(prefix)
        if self._behind_link(prefix):  # what a link points at is not stored in this root
            return []
        out = []
        for dirpath, _dirs, files in os.walk(top):  # never descends into linked directories
            for name in files:
                p = Path(dirpath) / name
                try:
                    st = p.lstat()
                except FileNotFoundError:  # deleted while listing
                    continue
                if stat.S_ISREG(st.st_mode):  # links and special files are not objects
                    out.append(ObjectInfo(p.relative_to(self.base).as_posix(), st.st_size, st.st_mtime))
        return out

    def children(self, prefix: str) -> list[str]:
        top = self._path(prefix)
        if not top.is_dir() or self._behind_link(prefix):
            return []
        return sorted(p.name for p in top.iterdir() if p.is_dir() and not p.is_symlink())

    def exists(self, key: str) -> bool:
        try:
            os.close(open_beneath(self.base, key))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, UnsafePathError):
            return False  # a link is not a stored object
        return True

    def _open(self, key: str) -> Any:
        return os.fdopen(open_beneath(self.base, key), "rb")

    def read_bytes(self, key: str) -> bytes:
        with self._open(key) as f:
            return f.read()

    def iter_chunks(self, key: str, chunk_size: int = HASH_CHUNK) -> Iterator[bytes]:
        with self._open(key) as f:
            while chunk := f.read(chunk_size):
                yield chunk

    def unsafe_entries(self, prefix: str) -> dict[str, str]:
        return unsafe_entries(self.base, prefix)

    def write_bytes(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A temp file in the same directory, then one rename: the target is always whole.
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                os.link(tmp, target)  # atomic create-if-absent; raises FileExistsError
            else:
                os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(target.parent)

    @contextmanager
    def exclusive(self, prefix: str) -> Iterator[None]:
        # An exclusive flock on a lock file in the directory of the updated keys: it lives in the
        # store root, so every workspace and process sharing the root takes the same lock. flock
        # is per open file description, so threads of one process exclude each other too.
        directory = self._path(prefix)
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_NAME, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def update_bytes(self, key: str, update: Update) -> bytes | None:
        with self.exclusive(key.rpartition("/")[0]):
            try:
                current: bytes | None = self.read_bytes(key)
            except FileNotFoundError:
                current = None
            new = update(current)
            if new is None:
                return current
            self.write_bytes(key, new)
            return new

    def delete_prefix(self, prefix: str) -> int:
        top = self._path(prefix)
        if not top.exists():
            return 0
        n = sum(len(files) for _d, _s, files in os.walk(top))
        remove_tree(top)
        return n

    def delete_tree(self, prefix: str) -> int:
        final = self._path(prefix)
        if final.is_symlink():  # the link goes; what it points at is not this store's to delete
            final.unlink()
            return 0
        if not final.exists():
            return 0
        # Same directory, hidden name: the version disappears at once (renaming a directory
        # within its parent needs no write permission on the read-only directory itself).
        doomed = final.parent / f"{self.staging_dir(prefix).name}.deleting-{uuid.uuid4().hex[:8]}"
        os.rename(final, doomed)
        _fsync_dir(final.parent)
        n = sum(len(files) for _d, _s, files in os.walk(doomed))
        remove_tree(doomed)
        return n

    def staging_dir(self, prefix: str) -> Path:
        """The hidden directory a publish of ``prefix`` is staged in (``<index>/.tmp-<version>``)."""
        final = self._path(prefix)
        return final.parent / f".tmp-{final.name}"

    def put_tree(self, src_dir: Path, files: Sequence[FileEntry], prefix: str, manifest: bytes) -> None:
        final = self._path(prefix)
        tmp = self.staging_dir(prefix)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            raise FileExistsError(f"snapshot {prefix!r} already exists in {self.root}")
        try:
            os.mkdir(tmp)  # exclusive: a second publisher of the same version stops here
        except FileExistsError:
            raise FileExistsError(
                f"{tmp} exists: a publish of {prefix!r} is running or was interrupted "
                "(`corpusforge snapshots gc` removes interrupted ones)"
            ) from None
        for entry in files:
            copy_verified(Path(src_dir) / entry.path, tmp / entry.path, entry)
        with open(tmp / MANIFEST_NAME, "xb") as f:
            f.write(manifest)
            f.flush()
            os.fsync(f.fileno())
        for dirpath, _dirs, _files in os.walk(tmp):
            _fsync_dir(Path(dirpath))
        make_read_only(tmp)
        # The commit point: one rename makes the whole snapshot appear at once. rename() refuses
        # to replace a non-empty directory, so a racing publisher of the same version cannot win
        # twice.
        os.rename(tmp, final)
        _fsync_dir(final.parent)

    def download(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._open(key) as f, open(dest, "wb") as out:
            shutil.copyfileobj(f, out, HASH_CHUNK)

    def local_path(self, prefix: str) -> Path | None:
        return self._path(prefix)


class S3Backend(Backend):
    """Snapshots under an S3 prefix (AWS or any S3-compatible server).

    Args:
        bucket: the bucket.
        prefix: the key prefix ("" for the bucket root).
        client: a boto3 S3 client.
        transfer_config: a ``boto3.s3.transfer.TransferConfig`` for multipart uploads and
            downloads (boto3's defaults when None: multipart above 8 MiB).
    """

    def __init__(self, bucket: str, prefix: str, client: Any, transfer_config: Any = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = client
        self.transfer_config = transfer_config
        self.root = f"s3://{bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _dir(self, prefix: str) -> str:
        return self.prefix + (prefix.strip("/") + "/" if prefix.strip("/") else "")

    @staticmethod
    def _code(err: Exception) -> str:
        return str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))

    def list(self, prefix: str) -> list[ObjectInfo]:
        out = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._dir(prefix))
        for page in pages:
            for obj in page.get("Contents", []):
                out.append(ObjectInfo(obj["Key"][len(self.prefix):], obj["Size"], obj["LastModified"].timestamp()))
        return out

    def children(self, prefix: str) -> list[str]:
        base = self._dir(prefix)
        names = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base, Delimiter="/")
        for page in pages:
            for cp in page.get("CommonPrefixes", []):
                names.append(cp["Prefix"][len(base):].rstrip("/"))
        return sorted(names)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if self._code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def _get(self, key: str) -> Any:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as e:
            if self._code(e) in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"{self.root}/{key}") from None
            raise

    def read_bytes(self, key: str) -> bytes:
        body = self._get(key)
        try:
            return body.read()
        finally:
            body.close()

    def iter_chunks(self, key: str, chunk_size: int = HASH_CHUNK) -> Iterator[bytes]:
        body = self._get(key)
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def write_bytes(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        from botocore.exceptions import ClientError

        kwargs = {"IfNoneMatch": "*"} if exclusive else {}
        try:
            # One PUT is atomic per object: readers get the old or the new content.
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **kwargs)
        except ClientError as e:
            if exclusive and self._code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise FileExistsError(f"{self.root}/{key} already exists") from None
            raise

    def update_bytes(self, key: str, update: Update) -> bytes | None:
        # Compare-and-swap with conditional writes: the PUT carries If-Match with the ETag of the
        # content read (If-None-Match: * when there was none), so it succeeds only if nobody wrote
        # in between; the loser reads again and retries. Needs an S3 API that honours conditional
        # PUTs (AWS S3 since 2024-11, MinIO, moto); one that ignores them gives last-writer-wins.
        from botocore.exceptions import ClientError

        for attempt in range(CAS_ATTEMPTS):
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as e:
                if self._code(e) not in ("404", "NoSuchKey", "NotFound"):
                    raise
                current, condition = None, {"IfNoneMatch": "*"}
            else:
                try:
                    current, condition = resp["Body"].read(), {"IfMatch": resp["ETag"]}
                finally:
                    resp["Body"].close()
            new = update(current)
            if new is None:
                return current
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=new, **condition)
                return new
            except ClientError as e:
                # 412: another write got in first; 409: a concurrent conditional write is still
                # in flight; 404 on If-Match: the object was deleted meanwhile. All: read again.
                if self._code(e) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"):
                    raise
            time.sleep(random.uniform(0, min(CAS_MAX_DELAY_S, CAS_BASE_DELAY_S * 2**attempt)))
        raise TimeoutError(f"{self.root}/{key}: concurrent writers kept changing it; gave up after {CAS_ATTEMPTS} attempts")

    def delete_prefix(self, prefix: str) -> int:
        base = self._dir(prefix)
        keys = [self._key(o.key) for o in self.list(prefix)]
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            resp = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if resp.get("Errors"):
                raise OSError(f"could not delete {len(resp['Errors'])} objects under {self.root}/{prefix}: {resp['Errors'][:3]}")
        # Parts of multipart uploads that an interrupted publish never completed are invisible
        # to listings but still stored (and billed): abort them too.
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=base)
        for page in pages:
            for up in page.get("Uploads", []):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
        return len(keys)

    def delete_tree(self, prefix: str) -> int:
        from botocore.exceptions import ClientError

        n = len(self.list(prefix))
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(f"{prefix}/{MANIFEST_NAME}"))
        except ClientError as e:
            if self._code(e) not in ("404", "NoSuchKey", "NotFound"):
                raise
        self.delete_prefix(prefix)
        return n

    def put_tree(self, src_dir: Path, files: Sequence[FileEntry], prefix: str, manifest: bytes) -> None:
        if self.list(prefix):
            raise FileExistsError(
                f"{self.root}/{prefix}/ already holds objects: the version exists, or a publish of it "
                "is running or was interrupted (`corpusforge snapshots gc` removes interrupted ones)"
            )
        extra = {"Config": self.transfer_config} if self.transfer_config is not None else {}
        for entry in files:
            with open(Path(src_dir) / entry.path, "rb") as f:
                reader = HashingReader(f)  # not seekable: boto3 reads it once, in order
                self.client.upload_fileobj(reader, self.bucket, self._key(f"{prefix}/{entry.path}"), **extra)
            reader.check(entry.path, entry.size, entry.sha256)
        # Manifest last, create-only: its presence is the commit, and of two racing publishers
        # of the same version only one commits.
        self.write_bytes(f"{prefix}/{MANIFEST_NAME}", manifest, exclusive=True)

    def download(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        extra = {"Config": self.transfer_config} if self.transfer_config is not None else {}
        self.client.download_file(self.bucket, self._key(key), str(dest), **extra)


def open_backend(
    root: str | os.PathLike[str],
    endpoint_url: str | None = None,
    *,
    client: Any = None,
    transfer_config: Any = None,
) -> Backend:
    """The backend for a store root.

    Args:
        root: a local directory, or ``s3://bucket[/prefix]``.
        endpoint_url: the S3 endpoint for S3-compatible servers (MinIO, moto...); ignored locally.
        client: a ready boto3 S3 client to use instead of creating one.
        transfer_config: a boto3 ``TransferConfig`` for S3 transfers.

    Returns:
        A :class:`LocalBackend` or an :class:`S3Backend`.

    Raises:
        ValueError: for another URI scheme, or an ``s3://`` URI without a bucket.
    """
    root_s = str(root)
    if root_s.startswith("s3://"):
        bucket, _, prefix = root_s[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"snapshot root {root_s!r} names no bucket (expected s3://bucket/prefix)")
        if client is None:
            import boto3

            client = boto3.client("s3", endpoint_url=endpoint_url)
        return S3Backend(bucket, prefix, client, transfer_config)
    if "://" in root_s:
        raise ValueError(f"unsupported snapshot root {root_s!r}: use a local directory or s3://bucket/prefix")
    return LocalBackend(root_s)
