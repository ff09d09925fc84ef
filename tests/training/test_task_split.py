"""Task-level split: deterministic, order independent, stable as a project grows."""

from __future__ import annotations

import random

import numpy as np

from training.data.split import split_by_task
from training.data.types import Instance, Sample


def _samples(ids) -> list[Sample]:
    inst = Instance("cat", None, np.array([0, 0, 1, 1], np.float32), "rectangle")
    return [Sample(t, f"{t}.png", [inst], 4, 4) for t in ids]


def _ids(samples) -> list:
    return [s.task_id for s in samples]


def test_split_is_deterministic_and_order_independent():
    samples = _samples(range(200))
    train, val = split_by_task(samples, 0.2, seed=3)
    assert 20 <= len(val) <= 60 and len(train) + len(val) == 200
    assert not set(_ids(train)) & set(_ids(val))
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    train2, val2 = split_by_task(shuffled, 0.2, seed=3)
    assert set(_ids(val2)) == set(_ids(val)) and set(_ids(train2)) == set(_ids(train))
    assert _ids(val2) == [s.task_id for s in shuffled if s.task_id in set(_ids(val))]  # input order kept
    _, other_seed = split_by_task(samples, 0.2, seed=4)
    assert set(_ids(other_seed)) != set(_ids(val))


def test_split_keeps_tasks_together_and_is_stable_when_tasks_are_added():
    samples = _samples([1, 1, 2, 2, 3, 3] + list(range(10, 60)))
    train, val = split_by_task(samples, 0.3, seed=0)
    for t in (1, 2, 3):
        assert _ids(train).count(t) in (0, 2) and _ids(val).count(t) in (0, 2)
    _, bigger_val = split_by_task(samples + _samples(range(100, 300)), 0.3, seed=0)
    assert set(_ids(val)) <= set(_ids(bigger_val))


def test_small_projects_still_get_a_validation_task():
    train, val = split_by_task(_samples(["a", "b"]), 0.01, seed=0)
    assert len(val) == 1 and len(train) == 1
    assert split_by_task(_samples(["a", "b"]), 0.0)[1] == []
    train, val = split_by_task(_samples(["a"]), 0.5)
    assert len(train) + len(val) == 1
