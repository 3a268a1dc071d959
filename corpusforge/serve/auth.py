"""API keys, ACL tags and per-key rate limits.

The keys file is YAML mapping each key to its caller::

    s3cr3t-key-1:
      name: rag-frontend
      acl: [public-web]          # tags whose chunks this key may receive (public chunks always)
      rate_limit_per_minute: 600
    adm1n-key:
      name: ops
      admin: true                # may call /admin/*

Keys are looked up by their sha256, so the lookup time does not depend on how much of a guessed
key matches a real one.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class KeySpec(BaseModel):
    """One key's entry in the keys file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    acl: list[str] = Field(default_factory=list)
    admin: bool = False
    rate_limit_per_minute: int | None = Field(default=None, ge=1)


@dataclass(frozen=True)
class Caller:
    """Who is calling.

    Attributes:
        name: the key's name ('anonymous' without a keys file).
        acl: the ACL tags the caller may see (public chunks are always visible).
        admin: may call admin endpoints.
        rate_limit_per_minute: the caller's limit (None = unlimited).
    """

    name: str
    acl: frozenset[str] = field(default_factory=frozenset)
    admin: bool = False
    rate_limit_per_minute: int | None = None


ANONYMOUS = Caller("anonymous")


class KeyFileError(ValueError):
    """The keys file is missing or malformed."""


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    """The API keys a server accepts.

    Args:
        entries: ``{key: KeySpec}``.
    """

    def __init__(self, entries: dict[str, KeySpec]) -> None:
        self._by_digest = {
            _digest(k): Caller(s.name, frozenset(s.acl), s.admin, s.rate_limit_per_minute) for k, s in entries.items()
        }

    @classmethod
    def from_file(cls, path: str | Path) -> "KeyStore":
        """Read a keys file.

        Args:
            path: the YAML file.

        Returns:
            The key store.

        Raises:
            KeyFileError: unreadable file, not a mapping, an empty key, or an invalid entry
                (the message names the key's *name* or position, never the key itself).
        """
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise KeyFileError(f"cannot read API keys file {path}: {exc}") from None
        if not isinstance(raw, dict) or not raw:
            raise KeyFileError(f"API keys file {path} must map keys to {{name, acl, admin, rate_limit_per_minute}}")
        entries = {}
        for i, (key, spec) in enumerate(raw.items(), 1):
            if not isinstance(key, str) or len(key) < 8:
                raise KeyFileError(f"API keys file {path}: entry {i}: keys must be strings of at least 8 characters")
            try:
                entries[key] = KeySpec.model_validate(spec or {})
            except ValidationError as exc:
                raise KeyFileError(f"API keys file {path}: entry {i}: {exc.errors()[0]['msg']} "
                                   f"at {'.'.join(map(str, exc.errors()[0]['loc']))}") from None
        return cls(entries)

    def lookup(self, key: str) -> Caller | None:
        """The caller owning a key, or None for an unknown key."""
        return self._by_digest.get(_digest(key))


class RateLimiter:
    """Token buckets per caller: ``rate_limit_per_minute`` tokens, refilled continuously.

    Not thread-safe: used from the event loop only.
    """

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, last time)

    def acquire(self, caller: Caller, cost: int = 1, paid: int = 0) -> float:
        """Take ``cost`` tokens from the caller's bucket, less what the request paid already.

        A request is charged in two steps when its cost is known only from its body: one token
        before the body is read (so that an exhausted caller's body is never read), the rest
        after (``paid=1``).

        Args:
            caller: the caller.
            cost: the request's whole cost (a batch request costs one per query).
            paid: tokens this request took before; given back when the rest is refused.

        Returns:
            0 when allowed; else the seconds until enough tokens will be there (nothing taken,
            ``paid`` given back).
        """
        limit = caller.rate_limit_per_minute
        if limit is None:
            return 0.0
        rate = limit / 60.0
        now = time.monotonic()
        tokens, last = self._buckets.get(caller.name, (float(limit), now))
        tokens = min(float(limit), tokens + (now - last) * rate)
        cost = min(cost, limit)  # a batch larger than the whole bucket waits for a full bucket
        if tokens >= cost - paid:
            self._buckets[caller.name] = (tokens - (cost - paid), now)
            return 0.0
        tokens = min(float(limit), tokens + paid)
        self._buckets[caller.name] = (tokens, now)
        return (cost - tokens) / rate


def retry_after_header(seconds: float) -> str:
    """The Retry-After value (whole seconds, at least 1)."""
    return str(max(1, math.ceil(seconds)))
