"""An LRU cache of search results keyed by the normalised query and everything that shapes the answer."""

from __future__ import annotations

import json
import threading
import unicodedata
from collections import OrderedDict
from typing import Any, Hashable


def normalise_query(query: str) -> str:
    """The canonical form of a query: Unicode NFC, whitespace runs collapsed, ends stripped.

    Case is kept: whether case matters is the model's and the BM25 tokenizer's business, and the
    normalised text is what gets searched, so a cached answer is always the answer to that text.

    Args:
        query: the raw query.

    Returns:
        The normalised query.
    """
    return " ".join(unicodedata.normalize("NFC", query).split())


def cache_key(version: str, query: str, mode: str, k: int, filters: dict[str, Any] | None,
              acl: frozenset[str], rerank: bool) -> Hashable:
    """The cache key of one search.

    Args:
        version: the snapshot version (a swap never serves another version's answers).
        query: the normalised query.
        mode: the search mode.
        k: hits asked for.
        filters: the metadata filters.
        acl: the caller's ACL tags (callers with different tags never share an entry).
        rerank: the rerank flag.

    Returns:
        A hashable key.
    """
    return (version, query, mode, k, json.dumps(filters, sort_keys=True) if filters else "", tuple(sorted(acl)), rerank)


class LRUCache:
    """A thread-safe least-recently-used cache.

    Args:
        capacity: the most entries kept; 0 disables caching.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        """The cached value, or None (marking the entry most recently used)."""
        if not self.capacity:
            return None
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        """Store a value, evicting the least recently used entry when full."""
        if not self.capacity:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
