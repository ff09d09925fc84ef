"""A byte-bounded, thread-safe LRU cache that computes each key at most once at a time (single flight)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable, Dict, Generic, Hashable, Optional, TypeVar

V = TypeVar("V")


class SingleFlightLRUCache(Generic[V]):
    """LRU by bytes. Concurrent `get_or_compute` calls for one key share one computation.

    The computation runs outside the lock, so other keys are served meanwhile; an entry bigger than the
    whole budget is returned but not kept. A failed computation is not cached and its error reaches every
    waiter of that flight.
    """

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        self.max_bytes = int(max_bytes)
        self._size_of = size_of
        self._lock = threading.Lock()
        self._entries: "OrderedDict[Hashable, tuple[V, int]]" = OrderedDict()
        self._inflight: Dict[Hashable, Future] = {}
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.computations = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: Hashable) -> Optional[V]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> V:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
            future = self._inflight.get(key)
            owner = future is None
            if owner:
                future = Future()
                self._inflight[key] = future
                self.misses += 1
            else:
                self.hits += 1
        if not owner:
            return future.result()
        try:
            value = compute()
        except BaseException as exc:
            with self._lock:
                self._inflight.pop(key, None)
            future.set_exception(exc)
            raise
        with self._lock:
            self.computations += 1
            self._inflight.pop(key, None)
            self._put_locked(key, value)
        future.set_result(value)
        return value

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._put_locked(key, value)

    def _put_locked(self, key: Hashable, value: V) -> None:
        size = int(self._size_of(value))
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        if size > self.max_bytes:
            return
        self._entries[key] = (value, size)
        self._bytes += size
        while self._bytes > self.max_bytes and self._entries:
            _, (_, s) = self._entries.popitem(last=False)
            self._bytes -= s

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
