"""Content addressing: stable hashes for documents, chunks, texts and configurations."""

from __future__ import annotations

import hashlib
import json
from typing import Any

_SEP = "\x1f"  # unit separator: cannot appear by accident between two hashed parts


def sha256_hex(data: bytes | str) -> str:
    """Hex sha256 of bytes or UTF-8 text."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def content_hash(title: str, text: str) -> str:
    """Hash of a document's content (title and text), used for exact-duplicate detection.

    Args:
        title: the document title ("" when none).
        text: the document body.

    Returns:
        A 64-character hex sha256.
    """
    return sha256_hex(title + _SEP + text)


def chunk_id(doc_id: str, text: str) -> str:
    """Stable id of a chunk, derived from its document id and its text only.

    The same input gives the same id on every run, so downstream caches keyed by chunk id stay
    valid when nothing changed.

    Args:
        doc_id: the id of the document the chunk came from.
        text: the chunk's text (as embedded).

    Returns:
        A 32-character hex digest.
    """
    return hashlib.blake2b((doc_id + _SEP + text).encode("utf-8"), digest_size=16).hexdigest()


def text_hash(text: str) -> str:
    """Hash of a text alone; the embedding cache key together with the model fingerprint."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def config_fingerprint(*parts: Any) -> str:
    """Fingerprint of JSON-serialisable configuration and upstream fingerprints.

    Args:
        *parts: any JSON-serialisable values (dicts are key-sorted).

    Returns:
        A 16-character hex digest that changes when any part changes.
    """
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(blob.encode("utf-8"), digest_size=8).hexdigest()
