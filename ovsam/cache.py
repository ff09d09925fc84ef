"""The project's one LRU cache: bounded by the size of what it holds, thread-safe, optionally single-flight.

Clients choose what goes into every cache here (image embeddings, downloaded images, parsed label configs),
so each is bounded by the size of its values (bytes, characters), not by a count of entries:
``cachetools.LRUCache`` with ``getsizeof``, behind a lock because the server's threads share it. A value
larger than ``max_entry`` is returned but not kept, so one huge entry cannot evict everything else.
:class:`SingleFlightLRUCache` adds that concurrent requests for one key share one computation (two clicks
on a new image encode it once).
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, Callable, Dict, Generic, Hashable, List, Optional, Sequence, Tuple, TypeVar

from cachetools import Cache, LRUCache

__all__ = ["SizedLRU", "SingleFlightLRUCache"]

V = TypeVar("V")


class _EvictingLRU(LRUCache):
    """cachetools' LRU that tells its owner what it evicts (a loaded model to log, a view to let go)."""

    def __init__(self, maxsize: int, getsizeof: Callable[[Any], int], on_evict: Optional[Callable[[Any, Any], None]]):
        super().__init__(maxsize=maxsize, getsizeof=getsizeof)
        self._on_evict = on_evict

    def popitem(self) -> Tuple[Any, Any]:
        key, value = super().popitem()
        if self._on_evict is not None:
            self._on_evict(key, value)
        return key, value


class SizedLRU(Generic[V]):
    """Thread-safe LRU whose values' total ``size_of`` stays within ``max_size`` (``size_of=lambda v: 1``: a count).

    ``on_evict(key, value)`` is called, under the cache's lock, for each entry evicted to make room.
    """

    def __init__(self, max_size: int, size_of: Callable[[V], int], max_entry: Optional[int] = None,
                 on_evict: Optional[Callable[[Hashable, V], None]] = None) -> None:
        self._size_of = size_of
        self._on_evict = on_evict
        self._lock = threading.Lock()
        self._max_entry = max_entry
        self._cache: LRUCache[Hashable, V] = self._new(max_size)

    def _new(self, max_size: int) -> "LRUCache[Hashable, V]":
        return _EvictingLRU(max(int(max_size), 0), lambda v: int(self._size_of(v)), self._on_evict)

    @property
    def max_size(self) -> int:
        return int(self._cache.maxsize)

    @property
    def max_entry(self) -> int:
        return self.max_size if self._max_entry is None else min(self._max_entry, self.max_size)

    @property
    def size(self) -> int:
        return int(self._cache.currsize)

    def __len__(self) -> int:
        return len(self._cache)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._cache

    def keys(self) -> list:
        """The keys held now (in no particular order)."""
        with self._lock:
            return list(self._cache.keys())

    def items(self) -> List[Tuple[Hashable, V]]:
        """The entries held now (in no particular order; reading them does not make them recent)."""
        with self._lock:
            return [(k, Cache.__getitem__(self._cache, k)) for k in list(self._cache.keys())]

    def values(self) -> List[V]:
        return [v for _, v in self.items()]

    def get(self, key: Hashable) -> Optional[V]:
        with self._lock:
            return self._cache.get(key)

    def put(self, key: Hashable, value: V) -> None:
        too_big = self._size_of(value) > self.max_entry
        with self._lock:
            if too_big:
                self._cache.pop(key, None)  # the old value under this key is stale either way
            else:
                self._cache[key] = value

    def resize(self, max_size: int, max_entry: Optional[int] = None) -> None:
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


class SingleFlightLRUCache(SizedLRU[V]):
    """A :class:`SizedLRU` (bounded in bytes) whose concurrent ``get_or_compute`` calls for one key share one
    computation. The computation runs outside the lock, so other keys are served meanwhile; a failed
    computation is not cached and its error reaches every waiter of that flight."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        super().__init__(max_bytes, size_of)
        self._inflight: Dict[Hashable, Future] = {}
        self.hits = 0
        self.misses = 0
        self.computations = 0

    @property
    def max_bytes(self) -> int:
        return self.max_size

    @property
    def nbytes(self) -> int:
        return self.size

    def get(self, key: Hashable) -> Optional[V]:
        value = super().get(key)
        if value is not None:
            with self._lock:
                self.hits += 1
        return value

    def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> V:
        return self.get_or_compute_many([key], lambda missing: [compute()])[0]

    def get_or_compute_many(self, keys: Sequence[Hashable], compute: Callable[[List[int]], List[V]]) -> List[V]:
        """The value of every key: cached ones as they are, those another thread is computing from its flight, and
        the rest from one call ``compute(indices)`` (indices into ``keys``), so pre-annotation encodes its missing
        images in one batch while a click on one of them waits for that batch instead of encoding it again."""
        values: List[Optional[V]] = [None] * len(keys)
        owned: List[Tuple[int, Future]] = []
        waiting: List[Tuple[int, Future]] = []
        with self._lock:
            for i, key in enumerate(keys):
                if key in self._cache:
                    self.hits += 1
                    values[i] = self._cache[key]  # cachetools marks it most recently used
                elif key in self._inflight:  # another thread's flight, or this call's own for a repeated key
                    self.hits += 1
                    waiting.append((i, self._inflight[key]))
                else:
                    self.misses += 1
                    self._inflight[key] = Future()
                    owned.append((i, self._inflight[key]))
        if owned:
            try:
                computed = compute([i for i, _ in owned])
                if len(computed) != len(owned):
                    raise RuntimeError(f"computed {len(computed)} values for {len(owned)} keys")
            except BaseException as exc:
                with self._lock:
                    for i, _ in owned:
                        self._inflight.pop(keys[i], None)
                for _, future in owned:
                    future.set_exception(exc)
                raise
            with self._lock:
                self.computations += len(owned)
                for i, _ in owned:
                    self._inflight.pop(keys[i], None)
            for (i, future), value in zip(owned, computed):
                self.put(keys[i], value)
                future.set_result(value)
                values[i] = value
        for i, future in waiting:
            values[i] = future.result()
        return values  # type: ignore[return-value]
