"""Inter-annotator agreement, used to keep only tasks that several annotators agree on.

The rule, per pair of annotations A and B of one task:
  1. Candidate pairs are regions with the same label. Their IoU is the mask IoU when both
     regions have a mask of the same size, otherwise the IoU of their boxes.
  2. Match greedily: repeatedly take the candidate pair with the highest IoU (> 0) whose two
     regions are both still unmatched (ties: the earlier region of A, then of B).
  3. agreement(A, B) = sum of matched IoUs / (matched + unmatched in A + unmatched in B).
     An object that only one annotator drew counts as IoU 0, so missing objects lower the
     score as much as sloppy outlines do. Two empty annotations agree fully (1.0).
The task's agreement is the mean over all pairs of its non-cancelled annotations.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from training.metrics import box_iou, mask_iou

from .types import Instance


def _region_iou(a: Instance, b: Instance) -> float:
    if a.mask is not None and b.mask is not None and a.mask.shape == b.mask.shape:
        return mask_iou(a.mask, b.mask)
    return float(box_iou(a.box[None], b.box[None])[0, 0])


def annotation_agreement(a: list[Instance], b: list[Instance]) -> float:
    """Agreement of two annotations of the same image, in [0, 1] (see the module docstring)."""
    if not a and not b:
        return 1.0
    pairs = []
    for i, ra in enumerate(a):
        for j, rb in enumerate(b):
            if ra.label == rb.label:
                iou = _region_iou(ra, rb)
                if iou > 0:
                    pairs.append((-iou, i, j))
    pairs.sort()
    used_a: set[int] = set()
    used_b: set[int] = set()
    total = 0.0
    for neg_iou, i, j in pairs:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            total -= neg_iou
    matched = len(used_a)
    return total / (matched + (len(a) - matched) + (len(b) - matched))


def task_agreement(annotations: list[list[Instance]]) -> float:
    """Mean pairwise agreement; 1.0 for fewer than two annotations."""
    scores = [annotation_agreement(a, b) for a, b in combinations(annotations, 2)]
    return float(np.mean(scores)) if scores else 1.0
