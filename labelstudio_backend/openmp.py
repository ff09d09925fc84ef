"""One OpenMP thread pool at a time: the model's threads keep busy-waiting between operations, as they do alone.

PyTorch's CPU kernels run on GNU OpenMP (libgomp, bundled with the Linux wheels). Every thread that runs a parallel
kernel gets its own pool of worker threads, and libgomp counts all of them: once there are more than the machine has
cores, it stops letting idle workers spin and puts them to sleep after ~100 polls, so each of the thousands of
small kernels of a pre-annotation pays a futex wake-up. The backend runs model calls on several threads (a lane for
clicks, one for batches, bulk jobs, the vocabulary builder), one at a time under the device lock
(``lanes.PriorityLock``); freeing a thread's pool when it lets go of the device keeps one pool alive, so the count
stays at the core count. Measured on 2 cores (bench/README.md): the server path used 1.6 cores for the same batch
the model alone ran on 1.95, and took ~10 % longer.

``omp_pause_resource_all`` (OpenMP 5.0) frees only the calling thread's pool; its next kernel builds a new one
(a thread start, tens of microseconds, against the tens of milliseconds of a model call).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

log = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1
F = TypeVar("F", bound=Callable[..., Any])


@lru_cache(maxsize=1)
def _libgomp() -> Optional[Any]:
    """The libgomp torch's kernels use (the one mapped into this process), or None (another OpenMP, or none)."""
    import torch  # (loads torch's OpenMP runtime)

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return None
    paths = sorted(set(re.findall(r"(/\S*libgomp[^/\s]*\.so[^/\s]*)", maps)))
    # Another library may have brought its own copy: torch's is the one whose pools its kernels use.
    torch_dir = str(Path(torch.__file__).resolve().parent)  # also matches a sibling torch.libs/
    ours = [p for p in paths if p.startswith(torch_dir)] or paths
    if not ours:
        return None
    try:
        lib = ctypes.CDLL(ours[0])
        lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
        lib.omp_pause_resource_all.restype = ctypes.c_int
    except (OSError, AttributeError) as exc:
        log.debug("libgomp at %s cannot free thread pools: %s", ours[0], exc)
        return None
    return lib


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP worker threads (soft pause); False when there is nothing to call."""
    lib = _libgomp()
    if lib is None:
        return False
    return lib.omp_pause_resource_all(_OMP_PAUSE_SOFT) == 0


def frees_thread_pool(fn: F) -> F:
    """Decorate model work that runs outside the device lock (loading a model, embedding a label set): the thread's
    OpenMP pool is freed when it returns, so an idle loader or builder thread does not keep one alive."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            release_thread_pool()

    return wrapper  # type: ignore[return-value]
