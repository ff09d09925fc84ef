"""Evaluation metrics: the paper's per-instance IoU/accuracy and pre-annotation quality.

Two questions, two metrics:
- `InstanceEvaluation`: given one GT prompt per instance, how good is the mask and is the label
  right? This is OVSAM's `InsClsIoUMetric` (micro-averaged over instances).
- `match_detections`: for whole-image pre-annotation, how many predicted regions are right,
  how many objects were found, and how many regions an annotator would accept unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

_EPS = 1e-8


def mask_iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """|gt ∧ pred| / (|gt ∨ pred| + 1e-8) on binary masks of the same shape."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"mask shapes differ: {gt.shape} vs {pred.shape}")
    inter = np.logical_and(gt, pred).sum()
    union = np.logical_or(gt, pred).sum()
    return float(inter / (union + _EPS))


def mask_iou_matrix(gts: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """Pairwise mask IoU of [n, H, W] and [m, H, W] stacks, giving [n, m]."""
    g = np.asarray(gts, dtype=bool).reshape(len(gts), -1).astype(np.float32)
    p = np.asarray(preds, dtype=bool).reshape(len(preds), -1).astype(np.float32)
    inter = g @ p.T
    union = g.sum(1)[:, None] + p.sum(1)[None, :] - inter
    return inter / (union + _EPS)


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Pairwise IoU of x1y1x2y2 boxes [n, 4] and [m, 4], giving [n, m]; empty boxes give 0."""
    a = np.asarray(boxes1, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes2, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


@dataclass
class _Group:
    count: int = 0
    correct: int = 0
    iou_sum: float = 0.0

    def add(self, correct: bool, iou: float) -> None:
        self.count += 1
        self.correct += int(correct)
        self.iou_sum += iou

    def miou(self) -> float | None:
        return self.iou_sum / self.count if self.count else None

    def accuracy(self) -> float | None:
        return self.correct / self.count if self.count else None


@dataclass
class InstanceEvaluation:
    """Accumulates one row per GT instance: (gt label, predicted label, mask IoU).

    Averages are over instances, not classes, as in the paper. `novel_labels`, when given,
    splits the instances by their GT label: labels in it are novel, all others base; without
    it the base/novel entries of `summary()` are None. Accuracies are fractions in [0, 1]
    (the paper prints them x100).
    """

    novel_labels: Collection[str] | None = None
    _all: _Group = field(default_factory=_Group)
    _base: _Group = field(default_factory=_Group)
    _novel: _Group = field(default_factory=_Group)
    _per_class: dict[str, _Group] = field(default_factory=lambda: defaultdict(_Group))

    def add(self, gt_label: str, pred_label: str | None, iou: float) -> None:
        correct = pred_label == gt_label
        self._all.add(correct, iou)
        self._per_class[gt_label].add(correct, iou)
        if self.novel_labels is not None:
            (self._novel if gt_label in self.novel_labels else self._base).add(correct, iou)

    def add_masks(self, gt_label: str, pred_label: str | None, gt_mask: np.ndarray, pred_mask: np.ndarray) -> float:
        """Add one instance from its masks; returns the IoU."""
        iou = mask_iou(gt_mask, pred_mask)
        self.add(gt_label, pred_label, iou)
        return iou

    def summary(self) -> dict:
        split = self.novel_labels is not None
        return {
            "count": self._all.count,
            "miou": self._all.miou(),
            "accuracy": self._all.accuracy(),
            "base_miou": self._base.miou() if split else None,
            "base_accuracy": self._base.accuracy() if split else None,
            "novel_miou": self._novel.miou() if split else None,
            "novel_accuracy": self._novel.accuracy() if split else None,
            "per_class": {
                label: {"count": g.count, "accuracy": g.accuracy(), "miou": g.miou()}
                for label, g in sorted(self._per_class.items())
            },
        }


@dataclass
class DetectionCounts:
    """Matching result for one or more images; add them up with `+` over a dataset.

    `accepted` counts predicted regions an annotator would keep unchanged: matched to a GT
    object of the same label with IoU >= the strict threshold (default 0.85; below that a
    human typically redraws or touches up the outline).
    """

    num_pred: int = 0
    num_gt: int = 0
    true_positives: int = 0
    accepted: int = 0
    matches: list[tuple[int, int, float]] = field(default_factory=list)

    @property
    def precision(self) -> float:
        """Fraction of predicted regions that match a GT object (1.0 when nothing was predicted)."""
        return self.true_positives / self.num_pred if self.num_pred else 1.0

    @property
    def recall(self) -> float:
        """Fraction of GT objects found (1.0 when there is nothing to find)."""
        return self.true_positives / self.num_gt if self.num_gt else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.num_pred if self.num_pred else 1.0

    def __add__(self, other: DetectionCounts) -> DetectionCounts:
        # Match indices are per image; a sum keeps only the counts.
        return DetectionCounts(
            self.num_pred + other.num_pred,
            self.num_gt + other.num_gt,
            self.true_positives + other.true_positives,
            self.accepted + other.accepted,
        )

    def as_dict(self) -> dict:
        return {
            "num_pred": self.num_pred,
            "num_gt": self.num_gt,
            "true_positives": self.true_positives,
            "accepted": self.accepted,
            "precision": self.precision,
            "recall": self.recall,
            "acceptance_rate": self.acceptance_rate,
        }


def match_detections(
    gt_masks: np.ndarray,
    gt_labels: Sequence[str],
    pred_masks: np.ndarray,
    pred_labels: Sequence[str],
    pred_scores: Sequence[float],
    iou_thr: float = 0.5,
    accept_iou: float = 0.85,
) -> DetectionCounts:
    """Match one image's predicted regions to its GT objects, greedily by score.

    Predictions are visited from the highest score down (ties: the earlier prediction); each
    takes the still-unmatched GT object *of the same label* with the highest IoU, if that IoU
    is >= `iou_thr` (COCO-style, class-aware). `matches` lists (pred index, gt index, IoU).
    """
    n_pred, n_gt = len(pred_labels), len(gt_labels)
    counts = DetectionCounts(num_pred=n_pred, num_gt=n_gt)
    if n_pred == 0 or n_gt == 0:
        return counts
    ious = mask_iou_matrix(gt_masks, pred_masks)  # [n_gt, n_pred]
    gt_labels_arr = np.asarray(gt_labels, dtype=object)
    taken = np.zeros(n_gt, dtype=bool)
    for p in np.argsort(-np.asarray(pred_scores, dtype=np.float64), kind="stable"):
        candidates = np.where((gt_labels_arr == pred_labels[p]) & ~taken, ious[:, p], -1.0)
        g = int(np.argmax(candidates))
        iou = float(candidates[g])
        if iou < iou_thr:
            continue
        taken[g] = True
        counts.true_positives += 1
        counts.accepted += int(iou >= accept_iou)
        counts.matches.append((int(p), g, iou))
    return counts
