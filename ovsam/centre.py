"""The evaluation's click: the "centre" point of a GT mask exactly as the reference OVSAM picks it.

The reference (`get_center_coords`) rescales the mask to the model frame (mmcv `imrescale`, nearest), pads
it with one pixel of background and runs kornia 0.7.x's `distance_transform` (kernel 3, h 0.35) on the
background, then takes the first maximum in raster order. That transform is a cascade: iteration i marks the
pixels touching the region reached so far (one ring, 8-connected, so ring i is the pixels at chessboard
distance i+1 from the background) and gives each `offset(i) + (-h · log S)`, S being the sum of the 3x3
kernel weights exp(-|d|/h) over its neighbours already reached (edge weight e = exp(-1/h), corner weight
c = exp(-√2/h)). -h·log S lies in [0.42, 1.415), so every ring's values sit above the previous ring's
(offset(i) = floor(1.5 i) up to kornia 0.8.1, i from 0.8.2; the argmax is the same for both). Hence the
point is: among the deepest pixels (largest chessboard distance), the one with the smallest S, i.e. the
fewest reached neighbours, corners counting less than edges; ties go to the first in raster order.

Computed here from cv2's exact chessboard distance and neighbour counts, with no float sums whose order a
CPU could change, and on the mask's bounding box only, so it costs one distance transform, not one 3x3
filtering of the whole image per ring.
"""
from __future__ import annotations

import math
from typing import Tuple

import cv2
import numpy as np

KERNEL_H = 0.35  # kornia's default `h`, kept by the reference
EDGE_WEIGHT = math.exp(-1.0 / KERNEL_H)
CORNER_WEIGHT = math.exp(-math.sqrt(2.0) / KERNEL_H)
_EDGES = ((-1, 0), (1, 0), (0, -1), (0, 1))
_CORNERS = ((-1, -1), (-1, 1), (1, -1), (1, 1))


def reference_rescale_size(height: int, width: int, target_hw: Tuple[int, int]) -> Tuple[int, int]:
    """(h, w) that mmcv `imrescale(mask, target_hw)` gives (mmdet `BitmapMasks.rescale`): the scale fits both
    the long and the short side of the target, so the result can be a pixel smaller than it (docs/REFERENCE_NOTES.md B10)."""
    long_edge, short_edge = max(target_hw), min(target_hw)
    scale = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def rescale_mask(mask: np.ndarray, target_hw: Tuple[int, int]) -> np.ndarray:
    """A GT mask resized (nearest) to the model frame `target_hw` = img_shape, as the reference does it."""
    h, w = reference_rescale_size(mask.shape[0], mask.shape[1], target_hw)
    m = np.asarray(mask, dtype=np.uint8)
    if (h, w) == m.shape:
        return m.astype(bool)
    return cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


def chessboard_depth(mask: np.ndarray) -> np.ndarray:
    """Chessboard (8-connected) distance of each mask pixel to the nearest background pixel or the border."""
    padded = np.pad(np.asarray(mask, dtype=np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_C, 3).astype(np.int64)[1:-1, 1:-1]


def centre_point(mask: np.ndarray) -> Tuple[int, int]:
    """(x, y) of the reference's centre point of a 2-D mask, in the mask's pixels; (0, 0) for an empty mask
    (the reference's all-zero transform also gives index 0)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"centre_point needs a 2-D mask, got shape {m.shape}")
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return 0, 0
    y0, x0 = int(rows[0]), int(cols[0])
    crop = m[y0 : rows[-1] + 1, x0 : cols[-1] + 1]  # pixels outside the box are background anyway
    depth = np.pad(chessboard_depth(crop), 1)  # the frame of zeros stands for the background around the box
    deepest = depth.max()
    reached = depth < deepest  # what the cascade has reached when it marks the deepest ring
    ys, xs = np.nonzero(depth == deepest)  # raster order
    edges = sum(reached[ys + dy, xs + dx].astype(np.int64) for dy, dx in _EDGES)
    corners = sum(reached[ys + dy, xs + dx].astype(np.int64) for dy, dx in _CORNERS)
    # Distinct (edges, corners) give distinct sums S (e/c is irrational), so comparing them in float64 is exact.
    weight = edges * EDGE_WEIGHT + corners * CORNER_WEIGHT
    best = int(np.argmin(weight))  # first minimum = first in raster order among equal S
    return x0 + int(xs[best]) - 1, y0 + int(ys[best]) - 1
