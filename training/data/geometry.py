"""Region geometry: Label Studio percent coordinates to pixels, masks to boxes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Tight x1, y1, x2, y2 of a mask with exclusive x2/y2 (COCO's bbox convention); zeros if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.zeros(4, dtype=np.float32)
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """`mask_to_box` for an [n, H, W] stack, giving [n, 4]."""
    return np.stack([mask_to_box(m) for m in masks]) if len(masks) else np.zeros((0, 4), np.float32)


def polygon_to_mask(points_px: np.ndarray, width: int, height: int) -> np.ndarray:
    """Fill a polygon given in continuous pixel coordinates (pixel i spans [i, i+1)).

    Uses COCO's rasteriser, so a polygon gives the same mask whether it arrives in a Label
    Studio JSON export or in Label Studio's COCO export (read by `load_coco`). A pixel-aligned
    rectangle with corners (10, 6) and (30, 24) covers columns 10..29 and rows 6..23.
    """
    flat = np.asarray(points_px, dtype=np.float64).reshape(-1).tolist()
    rle = mask_utils.frPyObjects([flat], height, width)
    return mask_utils.decode(rle)[:, :, 0].astype(bool)


def percent_points_to_px(points: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    """Label Studio polygon points (percent of width/height) to pixels, shape [k, 2]."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts * np.array([width / 100.0, height / 100.0])


def rectangle_to_box(x: float, y: float, w: float, h: float, rotation: float, width: int, height: int) -> np.ndarray:
    """Axis-aligned pixel box around a Label Studio rectangle, clipped to the image.

    Label Studio rotates the rectangle by `rotation` degrees (clockwise on screen, y down)
    around its top-left corner, so the rotation is applied in pixels, not in percent.
    """
    x0, y0 = x / 100.0 * width, y / 100.0 * height
    bw, bh = w / 100.0 * width, h / 100.0 * height
    theta = math.radians(rotation or 0.0)
    u = np.array([math.cos(theta), math.sin(theta)])
    v = np.array([-math.sin(theta), math.cos(theta)])
    corners = np.array([x0, y0]) + np.array([[0, 0], bw * u, bw * u + bh * v, bh * v])
    x1, y1 = corners.min(axis=0)
    x2, y2 = corners.max(axis=0)
    return np.array(
        [np.clip(x1, 0, width), np.clip(y1, 0, height), np.clip(x2, 0, width), np.clip(y2, 0, height)],
        dtype=np.float32,
    )


def box_is_empty(box: np.ndarray) -> bool:
    return bool(box[2] <= box[0] or box[3] <= box[1])
