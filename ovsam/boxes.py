"""Boxes of masks: the one tight-box rule of the project (the model, Label Studio results and training use it).

x2/y2 are exclusive edges (COCO's bbox convention): a mask covering columns 3..5 has x1=3, x2=6.
"""
from __future__ import annotations

import numpy as np


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Tight float32 x1, y1, x2, y2 of an HxW mask; zeros if it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.zeros(4, dtype=np.float32)
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """`mask_to_box` for an [n, H, W] stack, giving [n, 4]."""
    return np.stack([mask_to_box(m) for m in masks]) if len(masks) else np.zeros((0, 4), np.float32)


def box_is_empty(box: np.ndarray) -> bool:
    """Whether an x1, y1, x2, y2 box has no area."""
    return bool(box[2] <= box[0] or box[3] <= box[1])
