"""The snapshot being served, and the hot swap to a new aliased version.

`SnapshotHolder.current` is a plain reference to an immutable `LoadedSnapshot`. A request reads
it once and uses that object to the end, so replacing the reference (one atomic assignment)
never disturbs requests in flight: they finish on the old snapshot, which is freed when the last
of them lets go. A new version is fetched (checksums verified), opened and smoke-tested in full
before the swap; any failure is recorded as a refusal and the old snapshot keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from corpusforge.serve.loader import LoadedSnapshot, open_snapshot
from corpusforge.serve.settings import ServeSettings
from corpusforge.snapshots import SnapshotStore, VerificationError

log = logging.getLogger("corpusforge.serve")


@dataclass(frozen=True)
class Refusal:
    """A version the server refused to swap in.

    Attributes:
        version: the refused version id.
        reason: why, safe to show to clients (no local paths; details are in the server log).
        at: UTC epoch seconds of the refusal.
    """

    version: str
    reason: str
    at: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return asdict(self)


@dataclass(frozen=True)
class ReloadResult:
    """The outcome of one alias check.

    Attributes:
        status: 'unchanged', 'swapped', 'refused', 'skipped' (a refused version seen again by
            polling) or 'error' (the alias could not be read).
        version: the version now served (None before the first load).
        target: the version the alias pointed at.
        detail: a client-safe explanation for 'refused' and 'error'.
    """

    status: str
    version: str | None
    target: str | None = None
    detail: str | None = None


def client_safe_reason(exc: BaseException) -> str:
    """A refusal reason that names the problem without leaking paths or stack traces.

    Args:
        exc: the exception that refused the snapshot.

    Returns:
        The verification problems for a `VerificationError`, else the exception's type.
    """
    if isinstance(exc, VerificationError):
        problems = list(exc.report.problems)
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        return f"failed verification: {shown}"
    return f"could not be loaded ({type(exc).__name__}; details in the server log)"


class SnapshotHolder:
    """Holds the served snapshot and swaps in new versions of the alias.

    Args:
        settings: the serve settings (root, index, alias, cache_dir, endpoint_url).
        on_swap: called with the new `LoadedSnapshot` after every swap (metrics, cache reset).
        on_refusal: called with every `Refusal`.
    """

    def __init__(self, settings: ServeSettings, on_swap: Callable[[LoadedSnapshot], None] | None = None,
                 on_refusal: Callable[[Refusal], None] | None = None) -> None:
        self.settings = settings
        self.store = SnapshotStore(settings.root, endpoint_url=settings.endpoint_url)
        self.current: LoadedSnapshot | None = None
        self.last_refusal: Refusal | None = None
        self.last_error: str | None = None
        self.last_failure: str | None = None  # the last failure in full: server-side only (may name paths)
        self._lock = threading.Lock()  # one reload at a time; readers never take it
        self._on_swap, self._on_refusal = on_swap, on_refusal

    def refresh(self, force: bool = False) -> ReloadResult:
        """Resolve the alias and, when it moved, load the new version and swap it in.

        Args:
            force: retry a version that was refused before (polling skips it, to avoid
                re-verifying the same broken snapshot every few seconds).

        Returns:
            What happened.
        """
        with self._lock:
            s = self.settings
            served = self.current.version if self.current else None
            try:
                target = self.store.resolve(s.index, s.alias)
            except Exception as exc:  # store unreachable, alias missing: keep serving what we have
                self.last_error = f"cannot resolve alias {s.alias!r}: {type(exc).__name__}"
                self.last_failure = f"cannot resolve alias {s.index}/{s.alias} at {self.store.root}: {exc}"
                log.warning("cannot resolve alias %s/%s at %s: %s", s.index, s.alias, self.store.root, exc)
                return ReloadResult("error", served, None, self.last_error)
            self.last_error = None
            if target == served:
                return ReloadResult("unchanged", served, target)
            if not force and self.last_refusal is not None and self.last_refusal.version == target:
                return ReloadResult("skipped", served, target, self.last_refusal.reason)
            return self._load(target, served)

    def _load(self, target: str, served: str | None) -> ReloadResult:
        s = self.settings
        t0 = time.perf_counter()
        log.info("loading %s/%s (alias %s) from %s", s.index, target, s.alias, self.store.root)
        try:
            path = self.store.fetch(s.index, target, s.cache_dir)  # verifies every file's sha256
            snap = open_snapshot(path, self.store.manifest(s.index, target), s.query_runtime, s.encode_threads,
                                 s.export_dir, s.query_tower)
            if snap.version != target:
                raise ValueError(f"manifest version {snap.version} differs from the alias target {target}")
        except Exception as exc:
            refusal = Refusal(target, client_safe_reason(exc), time.time())
            self.last_refusal = refusal
            self.last_failure = f"snapshot {s.index}/{target} refused: {exc}"
            log.error("REFUSED snapshot %s/%s: %s (still serving %s)", s.index, target, exc, served, exc_info=True)
            if self._on_refusal:
                self._on_refusal(refusal)
            return ReloadResult("refused", served, target, refusal.reason)
        snap.load_seconds = time.perf_counter() - t0
        self.current = snap  # the swap: one reference assignment
        log.info("serving %s/%s (was %s), loaded in %.2fs", s.index, target, served, snap.load_seconds)
        if self._on_swap:
            self._on_swap(snap)
        return ReloadResult("swapped", target, target)
