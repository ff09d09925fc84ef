"""The backend's one size-bounded LRU cache (downloaded images, parsed label configs).

Clients choose what goes into these caches, so they are bounded by the size of
what they hold (bytes of an image, characters of a config), not by a count of
entries: ``cachetools.LRUCache`` with ``getsizeof``, behind a lock because the
server's threads share it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from cachetools import LRUCache

__all__ = ["SizedLRU"]

V = TypeVar("V")


class SizedLRU(Generic[V]):
    """Thread-safe LRU whose values' total ``size_of`` stays within ``max_size``.

    A value larger than ``max_entry`` (default: ``max_size``) is not kept, so
    one huge entry cannot evict everything else.
    """

    def __init__(self, max_size: int, size_of: Callable[[V], int], max_entry: int | None = None) -> None:
        self._size_of = size_of
        self._lock = threading.Lock()
        self._max_entry = max_entry
        self._cache: LRUCache[Hashable, V] = self._new(max_size)

    def _new(self, max_size: int) -> LRUCache[Hashable, V]:
        return LRUCache(maxsize=max(int(max_size), 0), getsizeof=self._size_of)

    @property
    def max_size(self) -> int:
        return int(self._cache.maxsize)

    @property
    def max_entry(self) -> int:
        return self.max_size if self._max_entry is None else min(self._max_entry, self.max_size)

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            return self._cache.get(key)

    def put(self, key: Hashable, value: V) -> None:
        if self._size_of(value) > self.max_entry:
            return
        with self._lock:
            self._cache[key] = value

    def resize(self, max_size: int, max_entry: int | None = None) -> None:
        """A new bound; entries over it are dropped, least recently used first."""
        with self._lock:
            old = self._cache
            self._max_entry = max_entry
            self._cache = self._new(max_size)
            for key in list(old.keys()):
                value = old[key]
                if self._size_of(value) <= self.max_entry:
                    self._cache[key] = value

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    @property
    def size(self) -> int:
        return int(self._cache.currsize)

    def __len__(self) -> int:
        return len(self._cache)
