"""Interactive work goes first: a device lock that lets an annotator's click overtake background work.

One device runs one model call at a time. Background work (pre-annotation
batches, text embeddings for a new label set) takes that lock once per model
call, like an interactive click does; when both wait, the click gets the device
next, so a batch only ever delays a click by the one model call it is in.

A thread says which lane it works in with :func:`background_lane`; every other
thread counts as interactive, so code that knows nothing of lanes (tests,
training) keeps plain lock semantics.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .openmp import release_thread_pool

__all__ = ["PriorityLock", "background_lane", "in_background_lane"]

_INTERACTIVE, _BACKGROUND = 0, 1
_lane = threading.local()


def in_background_lane() -> bool:
    return getattr(_lane, "priority", _INTERACTIVE) == _BACKGROUND


@contextmanager
def background_lane() -> Iterator[None]:
    """Mark this thread's model calls as background work (they yield to waiting clicks)."""
    previous = getattr(_lane, "priority", _INTERACTIVE)
    _lane.priority = _BACKGROUND
    try:
        yield
    finally:
        _lane.priority = previous


class PriorityLock:
    """A reentrant lock whose interactive waiters are served before background waiters."""

    def __init__(self, free_thread_pools: bool = False) -> None:
        # free_thread_pools: a CPU device's lock frees each holder's OpenMP pool on release (openmp.py says why).
        self._free_thread_pools = free_thread_pools
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._waiting_interactive = 0

    def acquire(self) -> bool:
        me = threading.get_ident()
        background = in_background_lane()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            if not background:
                self._waiting_interactive += 1
            try:
                while self._owner is not None or (background and self._waiting_interactive):
                    self._cond.wait()
            finally:
                if not background:
                    self._waiting_interactive -= 1
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a PriorityLock not held by this thread")
            self._depth -= 1
            released = self._depth == 0
            if released:
                self._owner = None
                self._cond.notify_all()
        if released and self._free_thread_pools:
            release_thread_pool()  # this thread's OpenMP workers; the next holder's own pool is the only one

    def yield_to_interactive(self) -> None:
        """Background work outside the lock: wait while a click holds the device or waits for it."""
        with self:
            pass

    @property
    def interactive_waiting(self) -> int:
        return self._waiting_interactive

    def __enter__(self) -> "PriorityLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
