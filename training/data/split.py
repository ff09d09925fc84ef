"""Train/validation split by task, stable as a project grows.

Each task id is hashed with the seed to a number in [0, 1); tasks below `val_fraction` go to
validation. The split does not depend on input order, all samples of a task (policy 'all')
land on the same side, and adding tasks to a project never moves existing tasks across the
split, so validation figures stay comparable between active-learning rounds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from .types import Sample


def task_fraction(task_id: int | str, seed: int) -> float:
    """Deterministic pseudo-random number in [0, 1) for a task (ids 5 and '5' are the same task)."""
    digest = hashlib.sha256(f"{seed}:{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_task(samples: Sequence[Sample], val_fraction: float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(train, val), each in input order.

    With `val_fraction > 0` and at least two tasks, validation is never empty: if no task
    falls below the fraction, the task with the smallest hash goes to validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    fractions = {s.task_id: task_fraction(s.task_id, seed) for s in samples}
    val_ids = {t for t, f in fractions.items() if f < val_fraction}
    if val_fraction > 0 and not val_ids and len(fractions) >= 2:
        val_ids = {min(fractions, key=lambda t: (fractions[t], str(t)))}
    train = [s for s in samples if s.task_id not in val_ids]
    val = [s for s in samples if s.task_id in val_ids]
    return train, val
