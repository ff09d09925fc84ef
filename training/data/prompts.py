"""Prompts from GT instances: random training prompts and the eval centre point."""

from __future__ import annotations

import numpy as np

from ovsam.centre import centre_point

from .augment import lsj_augment  # noqa: F401  (the training pipeline imports both from here)

BOX, POINT = 0, 1


def sample_training_prompts(
    masks: np.ndarray,
    boxes: np.ndarray,
    num_proposals: int = 40,
    num_box_prompts: int = 21,
    generator: np.random.Generator | None = None,
    has_mask: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Draw `num_proposals` prompts for one image the way OVSAM's CLIP2SAM training does.

    1. Repeat the instance list (floor(P/n)+1 copies when n < P) and keep the first P entries,
       in annotation order.
    2. One uniform random foreground pixel per entry (integer x, y).
    3. Randomly permute the entries.
    4. The first `num_box_prompts` entries of the permutation take their GT box, the rest
       their point (bp = [0]*21 + [1]*19).
    Box-only instances (`has_mask` False; by default: an empty mask) have no pixel to draw, so
    they always take box prompts and their point is (-1, -1); the remaining box slots go to
    the other entries in permuted order. Without box-only instances this is exactly the
    reference's rule.

    Returns arrays ordered [all box prompts; all point prompts], as the model encodes them:
    'indices' [P] into the inputs, 'prompt_types' [P] (0 box, 1 point), 'points' [P, 2] int64
    (x, y), 'boxes' [P, 4] float32, 'has_mask' [P] bool.
    """
    masks = np.asarray(masks, dtype=bool)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    n = len(masks)
    if n == 0 or len(boxes) != n:
        raise ValueError(f"need >= 1 instance with one box each, got {n} masks and {len(boxes)} boxes")
    rng = generator if generator is not None else np.random.default_rng()
    has_mask = masks.reshape(n, -1).any(axis=1) if has_mask is None else np.asarray(has_mask, dtype=bool)

    copies = num_proposals // n + 1 if n < num_proposals else 1
    idx = np.tile(np.arange(n), copies)[:num_proposals]
    points = np.full((num_proposals, 2), -1, dtype=np.int64)
    foreground: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for k, i in enumerate(idx):
        if has_mask[i]:
            if i not in foreground:
                foreground[i] = np.nonzero(masks[i])
            ys, xs = foreground[i]
            j = rng.integers(len(ys))
            points[k] = (xs[j], ys[j])

    perm = rng.permutation(num_proposals)
    idx, points = idx[perm], points[perm]
    box_only = ~has_mask[idx]
    rank_among_masked = np.cumsum(~box_only) - 1
    masked_box_slots = max(0, num_box_prompts - int(box_only.sum()))
    is_box = box_only | (rank_among_masked < masked_box_slots)
    order = np.argsort(~is_box, kind="stable")
    idx = idx[order]
    return {
        "indices": idx,
        "prompt_types": np.where(is_box[order], BOX, POINT).astype(np.int64),
        "points": points[order],
        "boxes": boxes[idx],
        "has_mask": has_mask[idx],
    }


def center_point(mask: np.ndarray) -> tuple[int, int]:
    """The evaluation prompt point of a GT mask, exactly as the reference picks it.

    `ovsam.centre.centre_point`: the deepest pixel by kornia 0.7.x's distance-transform cascade (the image
    border counts as background; among equally deep pixels the one with the fewest reached neighbours, then
    the first in raster order). Pass the mask in the frame the point is wanted in (the reference rescales it
    to the model frame first, `ovsam.centre.rescale_mask`).
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2 or not m.any():
        raise ValueError("center_point needs a non-empty 2-D mask")
    return centre_point(m)
