"""One run at a time per pipeline workspace: an exclusive, crash-safe lock.

Two runs writing one pipeline's workspace at once corrupt each other (one deletes the other's
temporary directories; MLflow's first-time setup of the SQLite store runs twice). Every runner
(the CLI's `Pipeline.run`, each `Pipeline.run_stage` that Dagster and Airflow call) takes
`workspace_lock` first; a second run of the same spec fails at once with `WorkspaceBusyError`,
which names the holder (the CLI exits with code 5).

The lock is an OS file lock (``flock``) on ``<workspace>/<name>/.lock`` taken through the
`filelock` package. The kernel drops it when its process ends, however it ends, so the lock of
a killed run is never left behind: the next run simply takes it over. Who holds it (pid, host,
start time, command) is written beside it in ``.lock.json``, for the message a refused run
prints; a record left by a dead process is replaced, and logged as a take-over.

The lock is re-entrant within a thread (``run`` holds it while each ``run_stage`` takes it
again); another thread of the same process is refused like another process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

log = logging.getLogger("corpusforge")

LOCK_FILE = ".lock"
INFO_FILE = ".lock.json"


class WorkspaceBusyError(RuntimeError):
    """Another run holds the workspace's lock.

    Attributes:
        base: the pipeline workspace.
        holder: the holder's record (pid, host, started_at, command), or None when unknown.
    """

    def __init__(self, base: Path, holder: dict[str, Any] | None):
        self.base, self.holder = base, holder
        who = "another run"
        if holder:
            who = (f"another run (pid {holder.get('pid')} on {holder.get('host')}, started "
                   f"{holder.get('started_at')}: {holder.get('command')})")
        super().__init__(f"workspace {base} is busy: {who} holds its lock ({base / LOCK_FILE}); "
                         "wait for it to finish, or stop it")


@dataclass
class _Hold:
    lock: FileLock
    thread: int
    count: int


_HELD: dict[str, _Hold] = {}
_HELD_GUARD = threading.Lock()


def read_holder(base: str | Path) -> dict[str, Any] | None:
    """The record of the run holding (or, after a crash, last holding) a workspace's lock.

    Args:
        base: the pipeline workspace (``<root>/<name>``).

    Returns:
        ``{"pid", "host", "started_at", "command"}``, or None when there is no readable record.
    """
    try:
        return json.loads((Path(base) / INFO_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def workspace_lock(base: str | Path) -> Iterator[None]:
    """Hold a pipeline workspace's exclusive lock for the duration of the block.

    Args:
        base: the pipeline workspace (``<root>/<name>``); created if missing.

    Yields:
        Nothing; the lock is held until the block exits.

    Raises:
        WorkspaceBusyError: another process, or another thread of this one, holds it.
    """
    base = Path(base)
    key = str(base.resolve() / LOCK_FILE)
    me = threading.get_ident()
    with _HELD_GUARD:
        hold = _HELD.get(key)
        if hold is not None:
            if hold.thread != me:
                raise WorkspaceBusyError(base, read_holder(base))
            hold.count += 1
    if hold is None:
        hold = _acquire(base, key, me)
    try:
        yield
    finally:
        with _HELD_GUARD:
            hold.count -= 1
            last = hold.count == 0
            if last:
                del _HELD[key]
        if last:
            # The record goes first: a record without a held lock then always means a crash.
            (base / INFO_FILE).unlink(missing_ok=True)
            hold.lock.release()


def _acquire(base: Path, key: str, thread: int) -> _Hold:
    base.mkdir(parents=True, exist_ok=True)
    lock = FileLock(key, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise WorkspaceBusyError(base, read_holder(base)) from None
    previous = read_holder(base)
    if previous and previous.get("pid") != os.getpid():
        pid = int(previous.get("pid") or 0)
        alive = pid > 0 and previous.get("host") == socket.gethostname() and _pid_alive(pid)
        log.warning("workspace %s: taking over the lock of pid %s on %s (started %s)%s", base,
                    previous.get("pid"), previous.get("host"), previous.get("started_at"),
                    "" if alive else ", which is no longer running")
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": " ".join(sys.argv)[:500]}
    tmp = base / f"{INFO_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, base / INFO_FILE)
    hold = _Hold(lock, thread, 1)
    with _HELD_GUARD:
        _HELD[key] = hold
    return hold
