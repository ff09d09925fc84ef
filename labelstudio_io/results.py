"""Build Label Studio result dicts from a predicted mask.

Label Studio stores whatever a backend returns without checking it against the
label config, so everything the editor needs is produced and checked here:
the brush RLE in Label Studio's own format (:mod:`.brush`, at the image's
natural size), or a polygon / box in percent of the
image. Every builder returns ``None`` for an empty mask, so callers can skip
it instead of storing a region the editor cannot show.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from ovsam.boxes import mask_to_box

from .brush import encode_brush
from .geometry import px_to_percent

if TYPE_CHECKING:
    from .label_config import ProjectSchema

__all__ = [
    "brush_result",
    "json_safe",
    "mask_result",
    "mask_to_polygon",
    "polygon_result",
    "rectangle_result",
    "schema_mask_result",
    "top_k_meta",
]

# approxPolyDP tolerance: this fraction of the contour's perimeter, at least
# POLYGON_MIN_EPSILON_PX. About 28 vertices for a large circle, 10 for a small
# one; the error stays below ~1% of the object's size.
POLYGON_EPSILON_FRACTION = 0.001
POLYGON_MIN_EPSILON_PX = 1.0


def json_safe(obj: Any) -> Any:
    """Convert numpy scalars/arrays and tuples to plain JSON values; reject NaN/inf and other types."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"value {obj!r} is not valid JSON")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ValueError(f"value of type {type(obj).__name__} is not JSON-serialisable")


def _as_mask(mask: Any) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"mask must be a non-empty 2-D array (H, W), got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"mask must be boolean or integer, got {arr.dtype}; threshold probabilities/logits first"
            )
        arr = arr != 0
    return arr


def _check_label(label: Any) -> str:
    if not isinstance(label, str) or not label:
        raise ValueError(f"label must be a non-empty string, got {label!r}")
    return label


def _base(
    rtype: str,
    width: int,
    height: int,
    label: str,
    from_name: str,
    to_name: str,
    score: float,
    meta: Mapping[str, Any] | None,
    value: dict[str, Any],
) -> dict[str, Any]:
    score_f = float(score)
    if not math.isfinite(score_f):
        raise ValueError(f"score must be finite, got {score!r}")
    value[rtype] = [_check_label(label)]
    out: dict[str, Any] = {
        "from_name": from_name,
        "to_name": to_name,
        "type": rtype,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": value,
        "score": score_f,
    }
    if meta is not None:
        out["meta"] = json_safe(meta)
        json.dumps(out["meta"], allow_nan=False)  # fail here, not in the HTTP layer
    return out


def brush_result(
    mask: Any,
    label: str,
    from_name: str,
    to_name: str,
    score: float,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """BrushLabels result; ``mask`` is HxW at the original image size. ``None`` if empty."""
    m = _as_mask(mask)
    if not m.any():
        return None
    height, width = m.shape
    value = {"format": "rle", "rle": encode_brush(m)}  # byte-identical to the SDK's mask2rle
    return _base("brushlabels", width, height, label, from_name, to_name, score, meta, value)


def mask_to_polygon(mask: Any, epsilon_px: float | None = None) -> list[list[float]] | None:
    """Largest external contour of ``mask`` as ``[[x%, y%], ...]`` (>= 3 points), or ``None``.

    Vertices are placed at pixel centres (``(col + 0.5) / W``), so a polygon
    drawn back over the image covers the same pixels.
    """
    m = _as_mask(mask)
    if not m.any():
        return None
    height, width = m.shape
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    contour = max(contours, key=lambda c: (cv2.contourArea(c), len(c)))
    if epsilon_px is None:
        epsilon_px = max(
            POLYGON_MIN_EPSILON_PX, POLYGON_EPSILON_FRACTION * cv2.arcLength(contour, True)
        )
    approx = cv2.approxPolyDP(contour, float(epsilon_px), True).reshape(-1, 2).astype(np.float64)
    if len(approx) >= 3:
        pts = approx + 0.5
    else:
        # A line or a dot: use the pixel-edge bounding box of that contour.
        x0, y0 = contour.reshape(-1, 2).min(axis=0)
        x1, y1 = contour.reshape(-1, 2).max(axis=0) + 1
        pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
    pts[:, 0] = np.clip(px_to_percent(pts[:, 0], width), 0.0, 100.0)
    pts[:, 1] = np.clip(px_to_percent(pts[:, 1], height), 0.0, 100.0)
    return [[round(float(x), 4), round(float(y), 4)] for x, y in pts]


def polygon_result(
    mask: Any,
    label: str,
    from_name: str,
    to_name: str,
    score: float,
    meta: Mapping[str, Any] | None = None,
    *,
    epsilon_px: float | None = None,
) -> dict[str, Any] | None:
    """PolygonLabels result from the mask's largest external contour. ``None`` if empty."""
    m = _as_mask(mask)
    points = mask_to_polygon(m, epsilon_px)
    if points is None:
        return None
    height, width = m.shape
    value = {"points": points, "closed": True}
    return _base("polygonlabels", width, height, label, from_name, to_name, score, meta, value)


def rectangle_result(
    mask_or_box: Any,
    label: str,
    from_name: str,
    to_name: str,
    score: float,
    meta: Mapping[str, Any] | None = None,
    *,
    width: int | None = None,
    height: int | None = None,
) -> dict[str, Any] | None:
    """RectangleLabels result from an HxW mask (its bounding box) or a pixel box.

    A box is ``[x1, y1, x2, y2]`` in pixels and needs ``width``/``height`` (the
    original image size); it is clipped to the image. ``None`` if empty.
    """
    arr = np.asarray(mask_or_box)
    if arr.ndim == 1:
        if arr.shape != (4,):
            raise ValueError(f"box must be [x1, y1, x2, y2], got shape {arr.shape}")
        if width is None or height is None:
            raise ValueError("rectangle_result from a box needs width and height")
        if not np.all(np.isfinite(arr.astype(np.float64))):
            raise ValueError(f"box must be finite, got {arr.tolist()}")
        x1, y1, x2, y2 = (float(v) for v in arr)
        x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
        y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
        w_img, h_img = int(width), int(height)
    else:
        m = _as_mask(arr)
        h_img, w_img = m.shape
        if width is not None and width != w_img or height is not None and height != h_img:
            raise ValueError(f"mask is {w_img}x{h_img} but width/height say {width}x{height}")
        if not m.any():
            return None
        x1, y1, x2, y2 = (float(v) for v in mask_to_box(m))
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    value = {
        "x": px_to_percent(x1, w_img),
        "y": px_to_percent(y1, h_img),
        "width": px_to_percent(x2 - x1, w_img),
        "height": px_to_percent(y2 - y1, h_img),
        "rotation": 0,
    }
    return _base("rectanglelabels", w_img, h_img, label, from_name, to_name, score, meta, value)


def mask_result(
    kind: str,
    mask: Any,
    label: str,
    from_name: str,
    to_name: str,
    score: float,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Dispatch on ``ProjectSchema.output.kind`` ("brush", "polygon" or "rectangle")."""
    builders = {"brush": brush_result, "polygon": polygon_result, "rectangle": rectangle_result}
    if kind not in builders:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {sorted(builders)}")
    return builders[kind](mask, label, from_name, to_name, score, meta)


def schema_mask_result(
    schema: "ProjectSchema",
    mask: Any,
    label: str,
    score: float,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """:func:`mask_result` for the project's output control; rejects labels outside its vocabulary."""
    if label not in schema.labels:
        raise ValueError(f"label {label!r} is not one of the project's labels {schema.labels}")
    return mask_result(
        schema.output.kind, mask, label, schema.output.name, schema.image_name, score, meta
    )


def top_k_meta(labels: Sequence[str], probabilities: Sequence[float], k: int = 5) -> dict[str, Any]:
    """``{"top_k": [{"label", "probability"}, ...]}`` for the k most probable labels."""
    probs = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if len(probs) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(probs)} probabilities")
    order = np.argsort(-probs, kind="stable")[: max(int(k), 0)]
    return {"top_k": [{"label": labels[i], "probability": float(probs[i])} for i in order]}
