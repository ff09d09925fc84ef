"""Metrics on hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import InstanceEvaluation, box_iou, mask_iou, match_detections


def _mask(x1, y1, x2, y2, h=10, w=10) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y1:y2, x1:x2] = True
    return m


def test_mask_iou():
    a, b = _mask(0, 0, 4, 4), _mask(2, 0, 6, 4)  # 16 and 16 px, overlap 8: 8 / 24
    assert mask_iou(a, b) == pytest.approx(1 / 3)
    assert mask_iou(a, a) == pytest.approx(1.0)
    assert mask_iou(np.zeros((3, 3)), np.zeros((3, 3))) == 0.0  # the 1e-8 keeps empty/empty at 0
    with pytest.raises(ValueError):
        mask_iou(a, np.zeros((3, 3)))


def test_box_iou():
    ious = box_iou(np.array([[0, 0, 4, 4], [0, 0, 0, 0]]), np.array([[2, 0, 6, 4], [0, 0, 4, 4], [10, 10, 12, 12]]))
    np.testing.assert_allclose(ious, [[1 / 3, 1, 0], [0, 0, 0]])


def test_instance_evaluation_summary():
    ev = InstanceEvaluation(novel_labels={"dog"})
    ev.add("cat", "cat", 0.8)
    ev.add("cat", "dog", 0.6)
    ev.add("dog", "dog", 0.4)
    assert ev.add_masks("bird", None, _mask(0, 0, 4, 4), _mask(2, 0, 6, 4)) == pytest.approx(1 / 3)
    s = ev.summary()
    assert s["count"] == 4
    assert s["miou"] == pytest.approx((0.8 + 0.6 + 0.4 + 1 / 3) / 4)
    assert s["accuracy"] == pytest.approx(2 / 4)
    assert s["novel_miou"] == pytest.approx(0.4) and s["novel_accuracy"] == 1.0
    assert s["base_miou"] == pytest.approx((0.8 + 0.6 + 1 / 3) / 3) and s["base_accuracy"] == pytest.approx(1 / 3)
    assert s["per_class"]["cat"] == {"count": 2, "accuracy": 0.5, "miou": pytest.approx(0.7)}
    assert list(s["per_class"]) == ["bird", "cat", "dog"]


def test_instance_evaluation_without_split():
    s = InstanceEvaluation().summary()
    assert s["count"] == 0 and s["miou"] is None and s["base_miou"] is None and s["novel_accuracy"] is None
    ev = InstanceEvaluation()
    ev.add("cat", "cat", 1.0)
    assert ev.summary()["base_accuracy"] is None and ev.summary()["accuracy"] == 1.0


def test_match_detections_greedy_by_score():
    gt = np.stack([_mask(0, 0, 5, 5), _mask(5, 5, 10, 10), _mask(0, 6, 3, 10)])
    gt_labels = ["cat", "dog", "cat"]
    pred = np.stack(
        [
            _mask(0, 0, 5, 5),  # cat, exact: accepted
            _mask(0, 0, 5, 4),  # cat, IoU 0.8 with GT 0, but lower score: GT 0 is taken -> false positive
            _mask(5, 5, 10, 9),  # dog, IoU 0.8: matched, not accepted (< 0.85)
            _mask(0, 6, 3, 10),  # exact shape of GT 2 but labelled dog: false positive
        ]
    )
    counts = match_detections(gt, gt_labels, pred, ["cat", "cat", "dog", "dog"], [0.9, 0.5, 0.8, 0.7])
    assert (counts.num_pred, counts.num_gt, counts.true_positives, counts.accepted) == (4, 3, 2, 1)
    assert counts.precision == pytest.approx(0.5) and counts.recall == pytest.approx(2 / 3)
    assert [(p, g) for p, g, _ in counts.matches] == [(0, 0), (2, 1)]
    # When the weaker prediction comes first by score, it takes the GT object instead.
    swapped = match_detections(gt, gt_labels, pred[:2], ["cat", "cat"], [0.1, 0.2])
    assert swapped.matches[0][:2] == (1, 0) and swapped.accepted == 0
    total = counts + swapped
    assert (total.num_pred, total.true_positives, total.accepted) == (6, 3, 1)
    assert match_detections(gt, gt_labels, pred, ["cat"] * 4, [1] * 4, accept_iou=0.75).accepted == 2


def test_match_detections_empty_cases():
    none = np.zeros((0, 10, 10), bool)
    c = match_detections(none, [], none, [], [])
    assert (c.precision, c.recall) == (1.0, 1.0)
    c = match_detections(np.stack([_mask(0, 0, 2, 2)]), ["cat"], none, [], [])
    assert (c.precision, c.recall, c.num_gt) == (1.0, 0.0, 1)
