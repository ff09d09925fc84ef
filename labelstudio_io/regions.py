"""Label Studio annotation regions -> label, mask and box in pixels: the format side of reading an export.

Brush, polygon and rectangle regions are understood. A region that cannot be used raises `RegionSkip`
with one of these reasons, which readers count rather than drop silently:
'unsupported region' (keypoints, choices, ...: not objects), 'no label', 'multiple labels', 'unknown label',
'missing size', 'bad box' (a rectangle without numeric x/y/width/height), 'empty box', 'corrupt mask' (RLE
that does not decode or has the wrong length), 'bad polygon' (fewer than 3 points), 'empty mask'.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from ovsam.boxes import box_is_empty, mask_to_box

from .brush import BrushDecodeError, decode_brush
from .geometry import percent_points_to_px, polygon_to_mask, rectangle_to_box

REGION_TYPES = {"brushlabels": "brush", "polygonlabels": "polygon", "rectanglelabels": "rectangle"}


class RegionSkip(Exception):
    """A region that yields no object; `reason` is one of the module's reasons."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Region:
    """One object of an annotation: `mask` is bool HxW (None for a rectangle), `box` float32 x1, y1, x2, y2
    in pixels with exclusive x2/y2; `kind` is 'brush', 'polygon' or 'rectangle'."""

    label: str
    kind: str
    mask: np.ndarray | None
    box: np.ndarray
    width: int
    height: int


def decode_region(region: Any, labels: Collection[str] | None = None) -> Region:
    """One result item of an annotation as a `Region`, or `RegionSkip` saying why not.

    `labels`: when given, a region with any other label is skipped ('unknown label').
    """
    if not isinstance(region, dict) or region.get("type") not in REGION_TYPES:
        raise RegionSkip("unsupported region")
    rtype = region["type"]
    value = region.get("value") or {}
    names = value.get(rtype) or value.get("labels") or []
    if isinstance(names, str):
        names = [names]
    if not names:
        raise RegionSkip("no label")
    if len(names) > 1:
        raise RegionSkip("multiple labels")
    label = names[0]
    if labels is not None and label not in labels:
        raise RegionSkip("unknown label")
    width, height = pixel_size(region.get("original_width")), pixel_size(region.get("original_height"))
    if width is None or height is None:
        raise RegionSkip("missing size")

    if rtype == "rectanglelabels":
        try:
            box = rectangle_to_box(
                float(value["x"]),
                float(value["y"]),
                float(value["width"]),
                float(value["height"]),
                float(value.get("rotation") or 0.0),
                width,
                height,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RegionSkip("bad box") from exc
        if box_is_empty(box):
            raise RegionSkip("empty box")
        return Region(label, REGION_TYPES[rtype], None, box, width, height)

    mask = _brush_mask(value, width, height) if rtype == "brushlabels" else _polygon_mask(value, width, height)
    if not mask.any():
        raise RegionSkip("empty mask")
    return Region(label, REGION_TYPES[rtype], mask, mask_to_box(mask), width, height)


def pixel_size(value: Any) -> int | None:
    """A positive integral pixel size (JSON may carry 160 or 160.0), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and float(value).is_integer():
        return int(value)
    return None


def task_image_ref(data: Any, image_key: str | None) -> str | None:
    """The image value of a task's `data`: `data[image_key]`, by default 'image', or its only string value."""
    if not isinstance(data, dict):
        return None
    if image_key is not None:
        value = data.get(image_key)
    elif "image" in data:
        value = data["image"]
    else:
        strings = [v for v in data.values() if isinstance(v, str)]
        value = strings[0] if len(strings) == 1 else None
    return value if isinstance(value, str) and value else None


def _brush_mask(value: dict, width: int, height: int) -> np.ndarray:
    rle = value.get("rle")
    if value.get("format", "rle") != "rle" or not isinstance(rle, list):
        raise RegionSkip("corrupt mask")
    try:
        return decode_brush(rle, width, height)
    except BrushDecodeError as exc:
        raise RegionSkip("corrupt mask") from exc


def _polygon_mask(value: dict, width: int, height: int) -> np.ndarray:
    points = value.get("points")
    try:
        pts = percent_points_to_px(points, width, height)
    except (TypeError, ValueError) as exc:
        raise RegionSkip("bad polygon") from exc
    if len(pts) < 3 or not np.isfinite(pts).all():
        raise RegionSkip("bad polygon")
    return polygon_to_mask(pts, width, height)
