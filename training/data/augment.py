"""Large-scale jitter (LSJ) for CLIP2SAM fine-tuning, at any output size."""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from ovsam.boxes import box_is_empty, mask_to_box


class Augmented(NamedTuple):
    """Result of `lsj_augment`. `keep` indexes the input instances that survived (for labels)."""

    image: np.ndarray  # [h, w, 3] uint8, h, w <= out_size; not padded (the model pads)
    masks: np.ndarray  # [k, h, w] bool; all False for box-only instances
    boxes: np.ndarray  # [k, 4] float32 x1y1x2y2
    keep: np.ndarray  # [k] int64


def lsj_augment(
    image: np.ndarray,
    masks: np.ndarray,
    boxes: np.ndarray,
    rng: np.random.Generator,
    out_size: int = 1024,
    ratio_range: tuple[float, float] = (0.9, 2.0),
    flip_prob: float = 0.5,
    has_mask: np.ndarray | None = None,
    min_mask_area: int = 32,
) -> Augmented:
    """Random horizontal flip, keep-ratio resize to a long side of out_size*r, random crop.

    r is uniform in `ratio_range` ((0.9, 2.0) for COCO, (0.1, 2.0) for LVIS). The crop is
    out_size x out_size (or the whole image when smaller). Boxes of masked instances are
    recomputed from the cropped masks; box-only instances (`has_mask` False, by default an
    empty mask) are shifted and clipped. Instances whose cropped mask has fewer than
    `min_mask_area` pixels, or box-only ones whose clipped box is empty, are dropped. The
    result can hold no instance; the caller then draws another image, as the reference does.
    """
    h, w = image.shape[:2]
    masks = np.asarray(masks, dtype=bool).reshape(-1, h, w)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    has_mask = masks.reshape(len(masks), -1).any(axis=1) if has_mask is None else np.asarray(has_mask, bool)

    if rng.random() < flip_prob:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]

    scale = out_size * rng.uniform(*ratio_range) / max(h, w)
    nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    image = cv2.resize(np.ascontiguousarray(image), (nw, nh), interpolation=cv2.INTER_LINEAR)
    boxes *= np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32)

    ch, cw = min(out_size, nh), min(out_size, nw)
    y0, x0 = int(rng.integers(0, nh - ch + 1)), int(rng.integers(0, nw - cw + 1))
    image = image[y0 : y0 + ch, x0 : x0 + cw]

    out_masks, out_boxes, keep = [], [], []
    for i in range(len(masks)):
        if has_mask[i]:
            resized = cv2.resize(masks[i].astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST)
            mask = resized[y0 : y0 + ch, x0 : x0 + cw].astype(bool)
            if mask.sum() < min_mask_area:
                continue
            box = mask_to_box(mask)
        else:
            mask = np.zeros((ch, cw), dtype=bool)
            box = np.clip(boxes[i] - np.array([x0, y0, x0, y0], np.float32), 0, [cw, ch, cw, ch]).astype(np.float32)
            if box_is_empty(box):
                continue
        out_masks.append(mask)
        out_boxes.append(box)
        keep.append(i)

    return Augmented(
        image=np.ascontiguousarray(image),
        masks=np.stack(out_masks) if out_masks else np.zeros((0, ch, cw), dtype=bool),
        boxes=np.stack(out_boxes) if out_boxes else np.zeros((0, 4), dtype=np.float32),
        keep=np.asarray(keep, dtype=np.int64),
    )
