"""The common in-memory form of annotated images, whatever file they came from."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


@dataclass(eq=False)
class Instance:
    """One annotated object.

    `mask` is a bool HxW array at the image's original size, or None for a box-only
    instance (a Label Studio rectangle): those train recognition and box prompts, never
    the mask loss or point prompts. `box` is float x1, y1, x2, y2 in pixels, where x2/y2
    are exclusive edges (a mask covering columns 3..5 has x1=3, x2=6).
    """

    label: str
    mask: np.ndarray | None
    box: np.ndarray
    region_type: str

    @property
    def has_mask(self) -> bool:
        return self.mask is not None


@dataclass(eq=False)
class Sample:
    """One image with its instances; `image_ref` is the URL or path exactly as the source gave it."""

    task_id: int | str
    image_ref: str
    instances: list[Instance]
    width: int
    height: int


@dataclass
class SkipReport:
    """Counts of rows a loader could not use, by reason.

    A row is whatever the reason names: a task ('no annotation', 'missing image'), an
    annotation ('cancelled', 'low agreement') or a region ('unknown label', 'empty mask',
    'corrupt mask', ...). A few task ids are kept per reason so the user can find them.
    """

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, task_id: int | str | None = None, count: int = 1) -> None:
        self.counts[reason] += count
        seen = self.examples.setdefault(reason, [])
        if task_id is not None and task_id not in seen and len(seen) < self.max_examples:
            seen.append(task_id)

    def merge(self, other: SkipReport) -> None:
        self.counts.update(other.counts)
        for reason, ids in other.examples.items():
            seen = self.examples.setdefault(reason, [])
            seen.extend(t for t in ids if t not in seen)
            del seen[self.max_examples :]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return self.total > 0

    def as_dict(self) -> dict[str, int]:
        return {reason: self.counts[reason] for reason in sorted(self.counts)}

    def summary(self) -> str:
        if not self.total:
            return "skipped nothing"
        parts = []
        for reason, count in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            ids = self.examples.get(reason)
            hint = f" (e.g. task {', '.join(map(str, ids))})" if ids else ""
            parts.append(f"{count} {reason}{hint}")
        return f"skipped {self.total}: " + "; ".join(parts)
