"""The single-flight, byte-bounded LRU cache, alone and behind OVSAMPredictor.set_image."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ovsam
from ovsam.cache import SingleFlightLRUCache
from ovsam.model import OVSAM
from ovsam.predictor import OVSAMPredictor
from ovsam.vocabulary import Vocabulary

TIMEOUT = 10.0


def _wait_until(cond, timeout=TIMEOUT):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


def _run_threads(n, target):
    results, errors = [None] * n, [None] * n

    def run(i):
        try:
            results[i] = target(i)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertions
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results, errors


def _join(threads):
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive(), "thread hung"


# ---- the cache alone ------------------------------------------------------------------------------


def test_hit_returns_same_object_without_recomputing():
    cache = SingleFlightLRUCache(1000, len)
    calls = []
    v1 = cache.get_or_compute("a", lambda: calls.append(1) or b"x" * 10)
    v2 = cache.get_or_compute("a", lambda: calls.append(1) or b"y" * 10)
    assert v1 is v2 and v1 == b"x" * 10
    assert len(calls) == 1
    assert cache.computations == 1 and cache.misses == 1 and cache.hits == 1
    assert "a" in cache and cache.get("a") == v1 and cache.get("zz") is None


def test_byte_bound_evicts_least_recently_used():
    cache = SingleFlightLRUCache(100, len)
    cache.get_or_compute("a", lambda: b"a" * 40)
    cache.get_or_compute("b", lambda: b"b" * 40)
    assert cache.nbytes == 80
    cache.get_or_compute("a", lambda: pytest.fail("a must be a hit"))  # a is now most recently used
    cache.get_or_compute("c", lambda: b"c" * 40)  # 120 > 100: evict the LRU entry, b
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.nbytes == 80 <= cache.max_bytes
    cache.put("d", b"d" * 100)  # needs the whole budget: everything else goes
    assert len(cache) == 1 and "d" in cache and cache.nbytes == 100
    cache.put("d", b"d" * 30)  # replacing an entry updates the byte count
    assert cache.nbytes == 30


def test_many_entries_never_exceed_the_bound():
    cache = SingleFlightLRUCache(1000, len)
    rs = np.random.RandomState(0)
    for i in range(200):
        size = int(rs.randint(1, 400))
        cache.get_or_compute(i, lambda s=size: b"z" * s)
        assert cache.nbytes <= 1000
        assert cache.nbytes == sum(len(cache.get(k)) for k in cache.keys())
    assert 199 in cache


def test_entry_larger_than_bound_is_returned_but_not_stored():
    cache = SingleFlightLRUCache(100, len)
    cache.get_or_compute("small", lambda: b"s" * 50)
    calls = []
    big = cache.get_or_compute("big", lambda: calls.append(1) or b"B" * 200)
    assert big == b"B" * 200
    assert "big" not in cache
    assert "small" in cache and cache.nbytes == 50
    cache.get_or_compute("big", lambda: calls.append(1) or b"B" * 200)
    assert len(calls) == 2  # not cached, so computed again


def test_concurrent_same_key_computes_once():
    cache = SingleFlightLRUCache(10_000, len)
    release = threading.Event()
    calls = []

    def compute():
        calls.append(threading.get_ident())
        assert release.wait(TIMEOUT)
        return bytearray(b"v" * 10)

    threads, results, errors = _run_threads(8, lambda i: cache.get_or_compute("k", compute))
    # All 7 other threads have joined the one flight before it is allowed to finish.
    _wait_until(lambda: cache.hits == 7 and len(calls) == 1)
    release.set()
    _join(threads)
    assert errors == [None] * 8
    assert len(calls) == 1 and cache.computations == 1
    assert all(r is results[0] for r in results)


def test_many_keys_compute_the_missing_ones_in_one_call():
    cache = SingleFlightLRUCache(10_000, len)
    cache.put("cached", b"c" * 4)
    calls = []

    def compute(missing):
        calls.append(list(missing))
        return [bytearray(b"v" * (i + 1)) for i in missing]

    values = cache.get_or_compute_many(["new0", "cached", "new2", "new0"], compute)
    assert calls == [[0, 2]]  # one call for the two distinct missing keys; the repeated key shares its flight
    assert values[0] is values[3] and values[1] == b"c" * 4 and values[2] == b"vvv"
    assert cache.misses == 2 and cache.hits == 2 and cache.computations == 2
    assert cache.get("new2") is values[2] and not cache._inflight


def test_a_single_key_in_a_batch_flight_waits_for_the_batch():
    cache = SingleFlightLRUCache(10_000, len)
    release = threading.Event()
    single_calls = []

    def batch(missing):
        assert release.wait(TIMEOUT)
        return [bytearray(b"b" * 3) for _ in missing]

    threads, results, errors = _run_threads(1, lambda i: cache.get_or_compute_many(["x", "y"], batch))
    _wait_until(lambda: "y" in cache._inflight)
    waiter, waited, waiter_errors = _run_threads(1, lambda i: cache.get_or_compute("y", lambda: single_calls.append(1)))
    _wait_until(lambda: cache.hits == 1)  # the click joined the batch's flight
    release.set()
    _join(threads + waiter)
    assert errors == [None] and waiter_errors == [None] and single_calls == []
    assert waited[0] is results[0][1]


def test_a_failed_batch_fails_its_waiters_and_caches_nothing():
    cache = SingleFlightLRUCache(10_000, len)
    release = threading.Event()

    def batch(missing):
        assert release.wait(TIMEOUT)
        raise RuntimeError("out of memory")

    threads, _, errors = _run_threads(1, lambda i: cache.get_or_compute_many(["x", "y"], batch))
    _wait_until(lambda: "x" in cache._inflight)
    waiter, _, waiter_errors = _run_threads(1, lambda i: cache.get_or_compute("x", lambda: b"never"))
    _wait_until(lambda: cache.hits == 1)
    release.set()
    _join(threads + waiter)
    assert isinstance(errors[0], RuntimeError) and isinstance(waiter_errors[0], RuntimeError)
    assert len(cache) == 0 and not cache._inflight
    assert cache.get_or_compute("x", lambda: b"later") == b"later"  # the next request computes afresh


def test_different_keys_compute_in_parallel():
    cache = SingleFlightLRUCache(10_000, len)
    n = 4
    barrier = threading.Barrier(n, timeout=TIMEOUT)

    def compute_for(i):
        def compute():
            barrier.wait()  # only passes if all n computations are running at the same time
            return b"x" * (i + 1)

        return compute

    threads, results, errors = _run_threads(n, lambda i: cache.get_or_compute(f"k{i}", compute_for(i)))
    _join(threads)
    assert errors == [None] * n
    assert results == [b"x" * (i + 1) for i in range(n)]
    assert cache.computations == n and len(cache) == n


def test_failing_compute_reaches_all_waiters_and_is_not_cached():
    cache = SingleFlightLRUCache(10_000, len)
    release = threading.Event()
    calls = []

    def failing():
        calls.append(1)
        assert release.wait(TIMEOUT)
        raise RuntimeError("model exploded")

    threads, results, errors = _run_threads(8, lambda i: cache.get_or_compute("k", failing))
    _wait_until(lambda: cache.hits == 7 and len(calls) == 1)
    release.set()
    _join(threads)
    assert len(calls) == 1
    assert all(isinstance(e, RuntimeError) and "model exploded" in str(e) for e in errors)
    assert "k" not in cache and len(cache) == 0 and cache.nbytes == 0
    assert cache.computations == 0
    # The next call tries again and may succeed.
    assert cache.get_or_compute("k", lambda: b"ok") == b"ok"
    assert "k" in cache


# ---- behind the predictor -------------------------------------------------------------------------


def _predictor(cache_bytes=1 << 30):
    torch.manual_seed(0)
    cfg = ovsam.get_config("tiny")
    model = OVSAM(cfg).eval()
    emb = F.normalize(torch.randn(3, 1, cfg.clip_embed_dim), dim=-1)
    vocab = Vocabulary(["a", "b", "c"], [["a"], ["b"], ["c"]], emb)
    return OVSAMPredictor(model, vocab, cache_bytes=cache_bytes, device="cpu")


class _CountingEncode:
    def __init__(self, fn, gate=None):
        self.fn, self.gate = fn, gate
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, image):
        with self.lock:
            self.calls += 1
        if self.gate is not None:
            assert self.gate.wait(TIMEOUT)
        return self.fn(image)


def _img(seed, h=40, w=60):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def test_set_image_twice_computes_once(monkeypatch):
    pred = _predictor()
    spy = _CountingEncode(pred.model.encode_image)
    monkeypatch.setattr(pred.model, "encode_image", spy)
    img = _img(0)
    f1 = pred.set_image(img)
    f2 = pred.set_image(img.copy())  # same pixels, different array
    assert spy.calls == 1 and f1 is f2
    assert pred.is_cached(img)
    pred.set_image(_img(1))
    assert spy.calls == 2
    assert not pred.is_cached(_img(2))
    # An explicit key identifies the image regardless of its pixels.
    pred.set_image(_img(3), key="k")
    pred.set_image(_img(4), key="k")
    assert spy.calls == 3


def test_predictor_cache_is_byte_bounded(monkeypatch):
    probe = _predictor()
    one = probe.set_image(_img(0)).nbytes
    pred = _predictor(cache_bytes=int(one * 2.5))
    spy = _CountingEncode(pred.model.encode_image)
    monkeypatch.setattr(pred.model, "encode_image", spy)
    for s in range(4):
        pred.set_image(_img(s))
        assert pred.cache.nbytes <= pred.cache.max_bytes
    assert len(pred.cache) == 2
    assert not pred.is_cached(_img(0)) and pred.is_cached(_img(3))
    calls = spy.calls
    pred.set_image(_img(0))  # evicted: recomputed
    assert spy.calls == calls + 1
    # Features larger than the whole budget are used but not stored.
    tiny = _predictor(cache_bytes=one // 2)
    f = tiny.set_image(_img(5))
    assert f.nbytes == one and len(tiny.cache) == 0
    assert tiny.predict(points=np.array([[10.0, 10.0]])).mask.shape == (40, 60)


def test_concurrent_set_image_same_image_computes_once(monkeypatch):
    pred = _predictor()
    gate = threading.Event()
    spy = _CountingEncode(pred.model.encode_image, gate)
    monkeypatch.setattr(pred.model, "encode_image", spy)
    img = _img(7)
    threads, results, errors = _run_threads(8, lambda i: pred.set_image(img.copy()))
    _wait_until(lambda: pred.cache.hits == 7 and spy.calls == 1)
    gate.set()
    _join(threads)
    assert errors == [None] * 8
    assert spy.calls == 1
    assert all(r is results[0] for r in results)


def test_concurrent_set_image_slow_compute_with_sleep(monkeypatch):
    pred = _predictor()
    original = pred.model.encode_image
    calls = []

    def slow(image):
        calls.append(1)
        time.sleep(0.3)
        return original(image)

    monkeypatch.setattr(pred.model, "encode_image", slow)
    img = _img(8)
    start = threading.Barrier(8, timeout=TIMEOUT)

    def worker(i):
        start.wait()
        return pred.set_image(img)

    threads, results, errors = _run_threads(8, worker)
    _join(threads)
    assert errors == [None] * 8
    assert len(calls) == 1
    assert all(r is results[0] for r in results)


def test_failing_encode_propagates_and_is_not_cached(monkeypatch):
    pred = _predictor()
    original = pred.model.encode_image
    gate = threading.Event()
    state = {"fail": True, "calls": 0}

    def flaky(image):
        state["calls"] += 1
        assert gate.wait(TIMEOUT)
        if state["fail"]:
            raise RuntimeError("out of memory (simulated)")
        return original(image)

    monkeypatch.setattr(pred.model, "encode_image", flaky)
    img = _img(9)
    threads, results, errors = _run_threads(4, lambda i: pred.set_image(img))
    _wait_until(lambda: pred.cache.hits == 3 and state["calls"] == 1)
    gate.set()
    _join(threads)
    assert state["calls"] == 1
    assert all(isinstance(e, RuntimeError) and "simulated" in str(e) for e in errors)
    assert not pred.is_cached(img)
    state["fail"] = False
    pred.set_image(img)
    assert state["calls"] == 2 and pred.is_cached(img)


def test_concurrent_different_images_each_computed_once_and_correct(monkeypatch):
    pred = _predictor()
    images = [_img(20 + i) for i in range(4)]
    with torch.inference_mode():
        expected = [pred.model.encode_image(im).embedding.clone() for im in images]
    spy = _CountingEncode(pred.model.encode_image)
    monkeypatch.setattr(pred.model, "encode_image", spy)
    start = threading.Barrier(8, timeout=TIMEOUT)

    def worker(i):
        start.wait()
        return pred.set_image(images[i % 4])

    threads, results, errors = _run_threads(8, worker)
    _join(threads)
    assert errors == [None] * 8
    assert spy.calls == 4 and len(pred.cache) == 4
    for i, feats in enumerate(results):
        torch.testing.assert_close(feats.embedding, expected[i % 4])
    assert not torch.allclose(results[0].embedding, results[1].embedding)


def test_sized_lru_tells_what_it_evicts_and_reading_items_does_not_make_them_recent():
    from ovsam.cache import SizedLRU

    evicted = []
    cache = SizedLRU(2, lambda v: 1, on_evict=lambda k, v: evicted.append((k, v)))
    cache.put("a", 1)
    cache.put("b", 2)
    assert sorted(cache.items()) == [("a", 1), ("b", 2)]  # "a" stays the least recently used
    cache.put("c", 3)
    assert evicted == [("a", 1)] and sorted(cache.keys()) == ["b", "c"]
    cache.get("b")
    cache.put("d", 4)
    assert evicted == [("a", 1), ("c", 3)]
