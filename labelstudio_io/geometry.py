"""Label Studio region geometry: percent of the original image <-> pixels, rotated rectangles, polygons.

Label Studio stores coordinates in percent (0-100) of `original_width`/`original_height`; a rectangle is
rotated by `rotation` degrees (clockwise on screen, y down) around its top-left corner, so the rotation is
applied in pixels, not in percent. Prompts, results and training exports all convert through here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils


def percent_to_px(value: float | np.ndarray, size: int) -> float | np.ndarray:
    """A percent coordinate or extent of an image side of `size` pixels, in pixels."""
    return value / 100.0 * size


def px_to_percent(value: float | np.ndarray, size: int) -> float | np.ndarray:
    """A pixel coordinate or extent in percent of an image side of `size` pixels."""
    return value / size * 100.0


def percent_points_to_px(points: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    """Label Studio polygon points (percent of width/height) to pixels, shape [k, 2]."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts * np.array([width / 100.0, height / 100.0])


def rotated_corners(x: float, y: float, w: float, h: float, rotation: float) -> tuple[list[float], list[float]]:
    """xs and ys of a rectangle's four corners, all in pixels, rotated `rotation` degrees around (x, y)."""
    if rotation % 360.0 == 0.0:
        return [x, x + w], [y, y + h]
    t = math.radians(rotation)
    c, s = math.cos(t), math.sin(t)
    corners = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)]
    return [x + cx * c - cy * s for cx, cy in corners], [y + cx * s + cy * c for cx, cy in corners]


def rectangle_to_box(x: float, y: float, w: float, h: float, rotation: float, width: int, height: int) -> np.ndarray:
    """Axis-aligned float32 pixel box around a Label Studio rectangle (percent values), clipped to the image."""
    xs, ys = rotated_corners(percent_to_px(x, width), percent_to_px(y, height), percent_to_px(w, width),
                             percent_to_px(h, height), rotation or 0.0)
    return np.array(
        [np.clip(min(xs), 0, width), np.clip(min(ys), 0, height), np.clip(max(xs), 0, width), np.clip(max(ys), 0, height)],
        dtype=np.float32,
    )


def polygon_to_mask(points_px: np.ndarray, width: int, height: int) -> np.ndarray:
    """Fill a polygon given in continuous pixel coordinates (pixel i spans [i, i+1)).

    Uses COCO's rasteriser, so a polygon gives the same mask whether it arrives in a Label
    Studio JSON export or in Label Studio's COCO export (read by `load_coco`). A pixel-aligned
    rectangle with corners (10, 6) and (30, 24) covers columns 10..29 and rows 6..23.
    """
    flat = np.asarray(points_px, dtype=np.float64).reshape(-1).tolist()
    rle = mask_utils.frPyObjects([flat], height, width)
    return mask_utils.decode(rle)[:, :, 0].astype(bool)
