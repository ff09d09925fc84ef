"""Large-scale jitter: output sizes, flips, box recomputation, dropping small instances."""

from __future__ import annotations

import numpy as np

from training.data.augment import lsj_augment
from ovsam.boxes import masks_to_boxes


def _scene(h: int = 100, w: int = 200):
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :, 0] = np.arange(w, dtype=np.uint8)[None, :]
    masks = np.zeros((3, h, w), bool)
    masks[0, 0:50, 0:40] = True
    masks[1, 60:64, 100:104] = True  # 16 px: dropped once scaled down
    boxes = masks_to_boxes(masks)
    boxes[2] = [0, 0, 40, 50]  # box-only instance (empty mask)
    return image, masks, boxes


def test_flip_and_resize_without_crop():
    image, masks, boxes = _scene()
    out = lsj_augment(
        image, masks, boxes, np.random.default_rng(0), out_size=100, ratio_range=(1.0, 1.0), flip_prob=1.0
    )
    assert out.image.shape == (50, 100, 3) and out.image.dtype == np.uint8
    assert out.image[0, 0, 0] > out.image[0, -1, 0]  # the horizontal ramp is mirrored
    np.testing.assert_array_equal(out.keep, [0, 2])
    assert out.masks.shape == (2, 50, 100)
    expected = np.zeros((50, 100), bool)
    expected[0:25, 80:100] = True
    np.testing.assert_array_equal(out.masks[0], expected)
    assert not out.masks[1].any()
    np.testing.assert_allclose(out.boxes, [[80, 0, 100, 25], [80, 0, 100, 25]])


def test_random_crop_recomputes_boxes_and_clips_box_only_instances():
    image, masks, boxes = _scene()
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = lsj_augment(image, masks, boxes, rng, out_size=128, ratio_range=(0.9, 2.0))
        h, w = out.image.shape[:2]
        assert 115 <= w <= 128 and 57 <= h <= 128  # long side 128 * r with r in [0.9, 2], cropped to 128
        assert out.masks.shape == (len(out.keep), h, w) and out.boxes.shape == (len(out.keep), 4)
        for i, mask, box in zip(out.keep, out.masks, out.boxes):
            if i == 2:
                assert not mask.any() and 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
            else:
                assert mask.sum() >= 32
                np.testing.assert_array_equal(box, masks_to_boxes(mask[None])[0])


def test_instances_cropped_away_are_dropped():
    image, masks, boxes = _scene()
    masks[1] = False
    masks[1, 90:100, 190:200] = True  # bottom-right corner only
    boxes[1] = [190, 90, 200, 100]
    rng = np.random.default_rng(5)
    results = [
        lsj_augment(image, masks, boxes, rng, out_size=64, ratio_range=(2.0, 2.0), flip_prob=0.0) for _ in range(10)
    ]
    # Long side 128 -> 64 x 128 image cropped to 64 x 64: the left and right objects never both survive.
    for out in results:
        assert out.image.shape == (64, 64, 3)
        assert not {0, 1} <= set(out.keep.tolist())
    assert any(len(out.keep) == 0 or set(out.keep.tolist()) == {1} for out in results)
