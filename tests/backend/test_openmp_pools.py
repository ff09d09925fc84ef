"""One OpenMP pool at a time: a thread that lets go of the CPU device lock frees its OpenMP workers (openmp.py)."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from labelstudio_backend import openmp
from labelstudio_backend.lanes import PriorityLock


def _thread_ids() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def _parallel_kernel() -> None:
    torch.ones(4_000_000).sum()  # well above ATen's grain size: runs on the thread's OpenMP pool


needs_gomp = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir() or openmp._libgomp() is None,
    reason="torch here does not run on GNU OpenMP (no pools to free)",
)


def _workers_while_holding_and_after(lock: PriorityLock) -> tuple[set[str], set[str]]:
    """A thread runs a parallel kernel under `lock` and stays alive after releasing it: the OpenMP worker threads
    that appeared while it held the lock, and the threads alive once it had released it."""
    seen: dict[str, set[str]] = {}
    done = threading.Event()
    torch.set_num_threads(2)  # the suite runs on one; a pool needs two (on any core count); conftest restores it

    def model_call() -> None:
        with lock:
            _parallel_kernel()
            seen["holding"] = _thread_ids()
        seen["released"] = _thread_ids()
        done.wait()

    before = _thread_ids()
    worker = threading.Thread(target=model_call)
    worker.start()
    try:
        while "released" not in seen and worker.is_alive():
            worker.join(0.01)
        workers = seen["holding"] - before - {str(worker.native_id)}
        assert workers, "the kernel started no OpenMP worker: nothing to test"
        return workers, seen["released"]
    finally:
        done.set()
        worker.join()


@needs_gomp
def test_a_thread_that_releases_the_cpu_lock_leaves_no_openmp_workers_behind():
    workers, alive_after = _workers_while_holding_and_after(PriorityLock(free_thread_pools=True))
    assert not (workers & alive_after)  # gone, while the thread that ran the kernel lives on


@needs_gomp
def test_without_freeing_the_pool_outlives_the_lock():
    """The control: a plain lock (GPU devices, library users) keeps the pool, so the test above can fail."""
    workers, alive_after = _workers_while_holding_and_after(PriorityLock())
    assert workers <= alive_after


def test_loaders_free_their_pool_even_when_they_fail(monkeypatch):
    calls = []
    monkeypatch.setattr(openmp, "release_thread_pool", lambda: calls.append(1) or True)

    @openmp.frees_thread_pool
    def load() -> None:
        raise ValueError("broken")

    with pytest.raises(ValueError):
        load()
    assert calls == [1]


def test_release_is_harmless_where_there_is_no_libgomp(monkeypatch):
    monkeypatch.setattr(openmp, "_libgomp", lambda: None)
    assert openmp.release_thread_pool() is False
