"""Reading snapshot files without following symbolic links.

A snapshot is verified (sizes, sha256) and then opened by name: by FAISS, bm25s and Arrow. A
symbolic link anywhere in a version -- a shard, a sub-directory, the version directory itself --
lets a file outside the snapshot root stand in for a checked one, and rewriting that file changes
what is served without any reload. So nothing at or below a version may be a link or a special
file: :func:`unsafe_entries` finds them for ``verify``, :func:`open_beneath` reads a file one path
component at a time with ``O_NOFOLLOW``, and :func:`pin_tree` lets a loader hold every file of a
version open while libraries open them by name, then check that the names still lead to the very
files it checked (:meth:`PinnedTree.check_unchanged`). The store root itself (and the folders
above it) may be links: where an operator mounts the store is their business.

POSIX only (``O_NOFOLLOW``, ``O_DIRECTORY``, ``dir_fd``).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
# O_NONBLOCK: a FIFO put in a file's place must not hang the open; it is cleared once the fd is
# known to be a regular file.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC


class UnsafePathError(OSError):
    """A path in a snapshot is a symbolic link or a special file, or changed after it was checked."""


def _parts(rel: str) -> list[str]:
    parts = [p for p in rel.split("/") if p] if rel else []
    if any(p in (".", "..") for p in parts):
        raise UnsafePathError(f"{rel!r}: '.' and '..' are not allowed in a snapshot path")
    return parts


def _open_part(name: str, dir_fd: int, flags: int, shown: str) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        # ELOOP is what O_NOFOLLOW answers for a link; confirm it before saying so.
        if e.errno == errno.ELOOP or (e.errno == errno.ENOTDIR and stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)):
            raise UnsafePathError(f"{shown!r} is a symbolic link (snapshot files must be regular files)") from None
        raise


def _regular(fd: int, shown: str) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafePathError(f"{shown!r} is not a regular file")
    os.set_blocking(fd, True)
    return st


def open_beneath(base: str | os.PathLike[str], rel: str) -> int:
    """Open ``base/rel`` read-only without following a symbolic link in any component of ``rel``.

    Args:
        base: the directory ``rel`` is relative to (itself may be a link).
        rel: a posix relative path of a regular file.

    Returns:
        An open file descriptor (the caller closes it).

    Raises:
        UnsafePathError: when a component of ``rel`` is a symbolic link, or the file is not regular.
        FileNotFoundError: when a component does not exist.
    """
    parts = _parts(rel)
    if not parts:
        raise IsADirectoryError(f"{str(base)!r}: no file named")
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        for i, part in enumerate(parts[:-1]):
            sub = _open_part(part, fd, _DIR_FLAGS, "/".join(parts[: i + 1]))
            os.close(fd)
            fd = sub
        out = _open_part(parts[-1], fd, _FILE_FLAGS, rel)
    finally:
        os.close(fd)
    _regular(out, rel)
    return out


def unsafe_entries(base: str | os.PathLike[str], rel: str) -> dict[str, str]:
    """Symbolic links and special files at ``base/rel``, on the way to it, or anywhere below it.

    Args:
        base: the store root (itself may be a link; not reported).
        rel: a posix relative path under ``base`` ("" for the whole root).

    Returns:
        ``{relative path: what it is}`` (e.g. ``"a symbolic link to '/tmp/x'"``), sorted by path;
        empty when everything is a plain file or directory (or ``rel`` does not exist).
    """
    base = Path(base)
    parts = _parts(rel)
    found: dict[str, str] = {}

    def describe(path: Path, key: str, st: os.stat_result) -> bool:
        if stat.S_ISLNK(st.st_mode):
            found[key] = f"a symbolic link to {os.readlink(path)!r}"
        elif not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            found[key] = "a special file (fifo, socket or device)"
        return key in found

    # The components leading to rel: a linked version directory is reported, never entered.
    for i in range(1, len(parts) + 1):
        key = "/".join(parts[:i])
        try:
            st = os.lstat(base / key)
        except FileNotFoundError:
            return {}
        if describe(base / key, key, st):
            return found
        if not stat.S_ISDIR(st.st_mode):
            return {}
    stack = [(base / rel if rel else base, "/".join(parts))]
    while stack:
        path, key = stack.pop()
        try:
            entries = list(os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):  # removed while scanning
            continue
        for entry in entries:
            sub = f"{key}/{entry.name}" if key else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not describe(Path(entry.path), sub, st) and stat.S_ISDIR(st.st_mode):
                stack.append((Path(entry.path), sub))
    return dict(sorted(found.items()))


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class PinnedTree:
    """Every file and directory of a snapshot directory, held open (see :func:`pin_tree`).

    Holding the descriptors keeps the inodes alive, so an inode number seen here cannot be reused
    by another file before :meth:`check_unchanged` compares it.

    Attributes:
        path: the pinned directory.
        identities: ``{relative path: (st_dev, st_ino, size, mtime_ns)}`` ("" is the top).
    """

    def __init__(self, path: Path, fds: dict[str, int], identities: dict[str, tuple[int, int, int, int]]) -> None:
        self.path = path
        self._fds = fds
        self.identities = identities

    def read_bytes(self, rel: str) -> bytes:
        """The content of a pinned file, read through the pinned descriptor (not by name).

        Args:
            rel: the file's relative posix path.

        Returns:
            Its bytes.

        Raises:
            FileNotFoundError: when the tree held no such regular file when pinned.
        """
        fd = self._fds.get(rel)
        if fd is None or rel == "" or stat.S_ISDIR(os.fstat(fd).st_mode):
            raise FileNotFoundError(f"{self.path}/{rel}")
        chunks, offset = [], 0
        while chunk := os.pread(fd, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def check_sizes(self, manifest: dict[str, Any]) -> None:
        """Check that every file the manifest lists was pinned with the listed size.

        Args:
            manifest: the snapshot's manifest (``files``: ``path`` and ``size``).

        Raises:
            UnsafePathError: when a listed file is missing or has another size.
        """
        for entry in manifest.get("files") or []:
            ident = self.identities.get(entry["path"])
            if ident is None:
                raise UnsafePathError(f"{self.path}: {entry['path']!r} is missing")
            if ident[2] != entry["size"]:
                raise UnsafePathError(f"{self.path}: {entry['path']!r} has size {ident[2]}, the manifest says {entry['size']}")

    def check_unchanged(self) -> None:
        """Walk the directory again (no links followed) and compare every entry with the pinned one.

        Call it after libraries have opened the files by name: equal identities mean they opened
        the pinned files, not something swapped in meanwhile.

        Raises:
            UnsafePathError: when an entry appeared, disappeared, became a link or is another file.
        """
        fds, now = _walk(self.path)
        for fd in fds.values():
            os.close(fd)
        if now != self.identities:
            changed = sorted(k for k in set(now) | set(self.identities) if now.get(k) != self.identities.get(k))
            raise UnsafePathError(f"{self.path}: snapshot files changed while it was being opened: {changed[:5]}")

    def close(self) -> None:
        """Close every pinned descriptor (idempotent)."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> PinnedTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _walk(path: Path) -> tuple[dict[str, int], dict[str, tuple[int, int, int, int]]]:
    """Open ``path`` and everything below it without following links; refuse links and special files."""
    fds: dict[str, int] = {}
    ids: dict[str, tuple[int, int, int, int]] = {}
    try:
        try:
            top = os.open(path, _DIR_FLAGS)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
                raise UnsafePathError(f"{str(path)!r} is a symbolic link (a snapshot directory must be a real directory)") from None
            raise
        fds[""] = top
        ids[""] = _identity(os.fstat(top))
        stack = [""]
        while stack:
            key = stack.pop()
            with os.scandir(fds[key]) as it:
                entries = sorted(e.name for e in it)
            for name in entries:
                sub = f"{key}/{name}" if key else name
                st = os.stat(name, dir_fd=fds[key], follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise UnsafePathError(f"{sub!r} in {str(path)!r} is a symbolic link (snapshot files must be regular files)")
                if stat.S_ISDIR(st.st_mode):
                    fd = _open_part(name, fds[key], _DIR_FLAGS, sub)
                    stack.append(sub)
                else:
                    fd = _open_part(name, fds[key], _FILE_FLAGS, sub)
                    _regular(fd, sub)  # closes fd when it is not a regular file
                fds[sub] = fd
                ids[sub] = _identity(os.fstat(fd))
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds, ids


def pin_tree(path: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> PinnedTree:
    """Open a snapshot directory and everything in it without following links, and hold it open.

    Args:
        path: the snapshot (version) directory; it must not be a link itself.
        manifest: when given, every file it lists must be there with the listed size.

    Returns:
        The pinned tree (close it, or use it as a context manager).

    Raises:
        UnsafePathError: for a symbolic link or special file anywhere in the tree, or a size
            that disagrees with the manifest.
        FileNotFoundError: when ``path`` does not exist.
    """
    fds, ids = _walk(Path(path))
    pinned = PinnedTree(Path(path), fds, ids)
    if manifest is not None:
        try:
            pinned.check_sizes(manifest)
        except BaseException:
            pinned.close()
            raise
    return pinned
