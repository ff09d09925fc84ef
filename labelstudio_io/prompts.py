"""Turn Label Studio's interactive context into one SAM-style prompt in pixels.

For a smart-tool click the editor sends ``params.context.result``: every smart
region of the current annotation with the same type, label and ``to_name`` as
the one just drawn. So all keypoints (positive and Alt+click negative) must be
combined, and a box, if any, added. Coordinates arrive in percent of the
original image (0-100); the model wants pixels, so they are converted here and
checked once, instead of letting a bad request reach the model.

The size the regions claim (``original_width``/``original_height``) is the
client's word; :func:`check_image_size` holds it against the image actually
loaded, because the answer's mask is drawn at the claimed size.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .geometry import percent_to_px, rotated_corners

__all__ = [
    "InteractivePrompt",
    "PromptError",
    "check_image_size",
    "parse_prompt",
    "prompt_from_context",
]

# Points may lie this fraction of the image size outside the image (the editor
# can place a point on the very edge); they are clipped. Boxes are clipped
# whatever their overhang (the editor lets annotators drag past the edge).
EDGE_TOLERANCE = 0.005
# How far the claimed image size may exceed the loaded image's, per side: a
# re-encoded or EXIF-rotated file can be off by rounding, not by more.
SIZE_TOLERANCE_PX = 1
SIZE_TOLERANCE_FRACTION = 0.01
# A box narrower or lower than this, in pixels, carries no usable extent.
MIN_BOX_SIZE_PX = 1.0

_KEYPOINT = "keypointlabels"
_RECTANGLE = "rectanglelabels"
_PROMPT_TYPES = (_KEYPOINT, _RECTANGLE)


class PromptError(ValueError):
    """The interactive context cannot be turned into a prompt (message says why)."""


@dataclass(frozen=True)
class InteractivePrompt:
    """One prompt for the model, in pixels of the original image.

    ``points`` is ``[P, 2]`` float64 ``(x, y)``; ``point_labels`` is ``[P]``
    int64 with 1 = positive, 0 = negative (SAM's convention); ``box`` is
    ``[4]`` float64 ``x1, y1, x2, y2`` or ``None``. ``width``/``height`` are the
    original image size the regions were drawn on, which is also the size the
    result masks must have. ``chosen_label`` is the label the annotator
    selected on the smart tool, if any; ``from_name``/``to_name`` are those of
    the region that provided it (or of the last prompt region).
    """

    points: np.ndarray
    point_labels: np.ndarray
    box: np.ndarray | None
    width: int
    height: int
    chosen_label: str | None = None
    from_name: str | None = None
    to_name: str | None = None
    image_rotation: float = 0.0
    region_ids: tuple[str, ...] = field(default_factory=tuple)

    @property
    def has_points(self) -> bool:
        return len(self.points) > 0

    @property
    def has_box(self) -> bool:
        return self.box is not None


def _number(value: Any, what: str) -> float:
    # bool is an int subclass in Python but never a coordinate.
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PromptError(f"{what} must be a number, got {value!r}")
    try:
        out = float(value)
    except OverflowError:  # an integer beyond float range, e.g. 400 digits
        raise PromptError(f"{what} must be a finite number, got an integer of {len(str(value))} digits") from None
    if not math.isfinite(out):
        raise PromptError(f"{what} must be finite, got {value!r}")
    return out


def _size(region: Mapping[str, Any], key: str, index: int) -> int:
    if key not in region or region[key] is None:
        raise PromptError(f"region {index} has no {key}; cannot convert percent to pixels")
    value = _number(region[key], f"region {index} {key}")
    if value <= 0 or value != int(value):
        raise PromptError(f"region {index} {key} must be a positive integer, got {region[key]!r}")
    return int(value)


def _is_positive(region: Mapping[str, Any]) -> bool:
    flag = region.get("is_positive", True)
    if isinstance(flag, str):
        return flag.strip().lower() not in {"false", "0", "no", ""}
    return bool(flag) if flag is not None else True


def _region_label(region: Mapping[str, Any]) -> str | None:
    value = region.get("value") or {}
    for key in (region.get("type"), "keypointlabels", "rectanglelabels", "labels"):
        labels = value.get(key) if isinstance(key, str) else None
        if isinstance(labels, list) and labels and isinstance(labels[0], str) and labels[0]:
            return labels[0]
    return None


def _check_coordinate(v: float, size: int, what: str, index: int) -> float:
    """Reject coordinates clearly outside [0, size]; clip those within the tolerance."""
    tol = EDGE_TOLERANCE * size
    if v < -tol or v > size + tol:
        raise PromptError(
            f"region {index} {what}={v:.2f}px lies outside the image (0..{size}px)"
        )
    return min(max(v, 0.0), float(size))


def _pixels(value: Mapping[str, Any], key: str, size: int, index: int) -> float:
    """``value[key]`` (percent) in pixels; finite percents can still overflow once scaled."""
    out = percent_to_px(_number(value.get(key), f"region {index} value.{key}"), size)
    if not math.isfinite(out):
        raise PromptError(f"region {index} value.{key}={value.get(key)!r} is far outside the image")
    return out


def _clip(v: float, size: int) -> float:
    return min(max(v, 0.0), float(size))


def _keypoint(value: Mapping[str, Any], w: int, h: int, index: int) -> tuple[float, float]:
    x = _pixels(value, "x", w, index)
    y = _pixels(value, "y", h, index)
    return _check_coordinate(x, w, "x", index), _check_coordinate(y, h, "y", index)


def _rectangle(value: Mapping[str, Any], w: int, h: int, index: int) -> np.ndarray:
    """The box's axis-aligned bounds clipped to the image; only a box with no overlap is refused."""
    x = _pixels(value, "x", w, index)
    y = _pixels(value, "y", h, index)
    bw = _pixels(value, "width", w, index)
    bh = _pixels(value, "height", h, index)
    rotation = value.get("rotation", 0) or 0
    rotation = _number(rotation, f"region {index} value.rotation")
    if bw < MIN_BOX_SIZE_PX or bh < MIN_BOX_SIZE_PX:
        raise PromptError(
            f"region {index} is a degenerate box ({bw:.2f}x{bh:.2f}px); draw a larger box"
        )
    xs, ys = rotated_corners(x, y, bw, bh, rotation)
    if not all(math.isfinite(v) for v in (*xs, *ys)):
        raise PromptError(f"region {index} box lies far outside the image")
    x1, x2 = _clip(min(xs), w), _clip(max(xs), w)
    y1, y2 = _clip(min(ys), h), _clip(max(ys), h)
    if x2 - x1 < MIN_BOX_SIZE_PX or y2 - y1 < MIN_BOX_SIZE_PX:
        raise PromptError(
            f"region {index} box ({min(xs):.1f}, {min(ys):.1f})-({max(xs):.1f}, {max(ys):.1f})px "
            f"has no extent inside the image (0..{w} x 0..{h}px)"
        )
    return np.array([x1, y1, x2, y2], dtype=np.float64)


def check_image_size(claimed_width: int, claimed_height: int, width: int, height: int) -> None:
    """Refuse a claimed size the loaded ``width`` x ``height`` image cannot explain.

    The answer's mask is drawn at the claimed size (Label Studio decodes it at
    ``original_width`` x ``original_height``), so a claim far beyond the real
    image would make the backend allocate what the client asks for. A smaller
    claim with the same aspect ratio is kept (the prompt is scaled); a larger
    one or a different aspect ratio, beyond rounding, raises :class:`PromptError`.
    """
    def slack(size: int) -> float:
        return max(SIZE_TOLERANCE_PX, SIZE_TOLERANCE_FRACTION * size)

    sizes = f"the regions were drawn on a {claimed_width}x{claimed_height} image but the task's image is {width}x{height}"
    if claimed_width > width + slack(width) or claimed_height > height + slack(height):
        raise PromptError(f"{sizes}; original_width/original_height must not exceed the image's size")
    # Heights implied by each other's aspect ratio: a downscaled claim rounds each side by up to 0.5 px.
    expected_height = claimed_width * height / width
    if abs(expected_height - claimed_height) > slack(claimed_height) + 0.5 * (1 + height / width):
        raise PromptError(f"{sizes}; their aspect ratios differ")


def parse_prompt(
    result: Sequence[Mapping[str, Any]] | None,
    *,
    from_names: Collection[str] | None = None,
) -> InteractivePrompt:
    """Combine the prompt regions of ``context.result`` into one prompt.

    Only ``keypointlabels`` and ``rectanglelabels`` regions count (and, when
    ``from_names`` is given, only those from these controls, e.g.
    ``ProjectSchema.prompt_controls``). All keypoints are kept; of several
    boxes the last one wins. Raises :class:`PromptError` on invalid input.
    """
    if result is None:
        raise PromptError("interactive context has no 'result' list")
    if not isinstance(result, Sequence) or isinstance(result, (str, bytes)):
        raise PromptError(f"interactive context 'result' must be a list, got {type(result).__name__}")
    if not result:
        raise PromptError("interactive context 'result' is empty")

    points: list[tuple[float, float]] = []
    labels: list[int] = []
    box: np.ndarray | None = None
    size: tuple[int, int] | None = None
    chosen_label: str | None = None
    label_region: Mapping[str, Any] | None = None
    last_region: Mapping[str, Any] | None = None
    rotation = 0.0
    ids: list[str] = []

    for index, region in enumerate(result):
        if not isinstance(region, Mapping):
            raise PromptError(f"region {index} must be an object, got {type(region).__name__}")
        rtype = str(region.get("type") or "").lower()
        if rtype not in _PROMPT_TYPES:
            continue
        if from_names is not None and region.get("from_name") not in from_names:
            continue
        value = region.get("value")
        if not isinstance(value, Mapping):
            raise PromptError(f"region {index} has no 'value' object")

        w = _size(region, "original_width", index)
        h = _size(region, "original_height", index)
        if size is None:
            size = (w, h)
        elif size != (w, h):
            raise PromptError(
                f"regions disagree on the image size: {size[0]}x{size[1]} vs {w}x{h} (region {index})"
            )

        if rtype == _KEYPOINT:
            points.append(_keypoint(value, w, h, index))
            labels.append(1 if _is_positive(region) else 0)
        else:
            box = _rectangle(value, w, h, index)

        label = _region_label(region)
        if label is not None:
            chosen_label, label_region = label, region
        last_region = region
        if region.get("image_rotation") is not None:
            rotation = _number(region.get("image_rotation"), f"region {index} image_rotation")
        if region.get("id") is not None:
            ids.append(str(region["id"]))

    if size is None or last_region is None:
        raise PromptError(
            "interactive context has no keypoint or rectangle region to use as a prompt"
        )
    names_from = label_region if label_region is not None else last_region
    return InteractivePrompt(
        points=np.asarray(points, dtype=np.float64).reshape(-1, 2),
        point_labels=np.asarray(labels, dtype=np.int64),
        box=box,
        width=size[0],
        height=size[1],
        chosen_label=chosen_label,
        from_name=names_from.get("from_name"),
        to_name=names_from.get("to_name"),
        image_rotation=rotation,
        region_ids=tuple(ids),
    )


def prompt_from_context(
    context: Mapping[str, Any] | None,
    *,
    from_names: Collection[str] | None = None,
) -> InteractivePrompt:
    """:func:`parse_prompt` on ``params.context`` as sent by Label Studio."""
    if not isinstance(context, Mapping):
        raise PromptError("request has no interactive context (params.context is empty)")
    return parse_prompt(context.get("result"), from_names=from_names)
