"""Training prompt sampling and the evaluation centre point."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ovsam.boxes import masks_to_boxes
from training.data.prompts import BOX, POINT, center_point, sample_training_prompts


def _instances(n: int, h: int = 48, w: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        masks[i, y : y + rng.integers(2, 8), x : x + rng.integers(2, 8)] = True
        masks[i, rng.integers(0, h), rng.integers(0, w)] = True  # a stray pixel: non-convex masks too
    return masks, masks_to_boxes(masks)


def test_few_instances_are_repeated_and_split_21_boxes_19_points():
    masks, boxes = _instances(3)
    out = sample_training_prompts(masks, boxes, generator=np.random.default_rng(0))
    assert {k: v.shape for k, v in out.items()} == {
        "indices": (40,),
        "prompt_types": (40,),
        "points": (40, 2),
        "boxes": (40, 4),
        "has_mask": (40,),
    }
    # 14 copies of [0, 1, 2] truncated to 40: instance 0 appears 14 times, the others 13.
    assert Counter(out["indices"].tolist()) == {0: 14, 1: 13, 2: 13}
    np.testing.assert_array_equal(out["prompt_types"], [BOX] * 21 + [POINT] * 19)
    np.testing.assert_array_equal(out["boxes"], boxes[out["indices"]])
    assert out["has_mask"].all()


def test_points_are_integer_foreground_pixels_of_their_instance():
    masks, boxes = _instances(5)
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(20):
        out = sample_training_prompts(masks, boxes, generator=rng)
        assert out["points"].dtype == np.int64
        for i, (x, y) in zip(out["indices"], out["points"]):
            assert masks[i, y, x]
            seen.add((int(i), int(x), int(y)))
    assert len(seen) > 5 * 3  # points vary: uniform over pixels, not one fixed pixel


def test_many_instances_keep_the_first_40_in_annotation_order():
    masks, boxes = _instances(55)
    out = sample_training_prompts(masks, boxes, generator=np.random.default_rng(2))
    assert sorted(out["indices"].tolist()) == list(range(40))
    other = sample_training_prompts(masks, boxes, generator=np.random.default_rng(3))
    assert out["indices"].tolist() != other["indices"].tolist()  # the permutation is random
    again = sample_training_prompts(masks, boxes, generator=np.random.default_rng(2))
    for key in out:
        np.testing.assert_array_equal(out[key], again[key])


def test_box_only_instances_always_take_box_prompts():
    masks, boxes = _instances(4)
    masks[1] = False  # box-only: no mask, keep its box
    for seed in range(10):
        out = sample_training_prompts(masks, boxes, generator=np.random.default_rng(seed))
        box_only = out["indices"] == 1
        assert (out["prompt_types"][box_only] == BOX).all() and (out["points"][box_only] == -1).all()
        np.testing.assert_array_equal(out["prompt_types"], [BOX] * 21 + [POINT] * 19)
    # More box-only entries than box slots: all of them are box prompts, the rest points.
    masks[[0, 2]] = False
    out = sample_training_prompts(masks, boxes, generator=np.random.default_rng(0))
    assert (out["prompt_types"] == BOX).sum() == 30 and (out["prompt_types"][out["has_mask"]] == POINT).all()


def test_no_instances_is_an_error():
    with pytest.raises(ValueError):
        sample_training_prompts(np.zeros((0, 4, 4), bool), np.zeros((0, 4)))


def test_center_point_of_an_odd_square_is_its_centre():
    mask = np.zeros((40, 50), bool)
    mask[5:26, 10:31] = True  # 21 x 21, centre (x=20, y=15)
    assert center_point(mask) == (20, 15)


def test_center_point_of_a_rectangle_is_on_its_middle_row_past_the_ridge_end():
    mask = np.zeros((30, 60), bool)
    mask[10:21, 5:55] = True  # 11 rows: the deepest pixels are row 15, x 10..49
    x, y = center_point(mask)
    # The reference's cascade scores the ridge's end pixel (x=10) lower: it also touches the pixel left of it,
    # already reached. The first interior ridge pixel wins; a Euclidean or chessboard argmax would say x=10.
    assert y == 15 and x == 11


def test_center_point_treats_the_image_border_as_background():
    assert center_point(np.ones((7, 7), bool)) == (3, 3)
    mask = np.zeros((20, 20), bool)
    mask[:, :9] = True  # touches the top, left and bottom borders: column 4 is deepest
    assert center_point(mask)[0] == 4


def test_center_point_lands_inside_a_ring_and_an_l_shape():
    yy, xx = np.mgrid[0:41, 0:41]
    r = np.hypot(yy - 20, xx - 20)
    ring = (r <= 18) & (r >= 10)
    x, y = center_point(ring)
    assert ring[y, x] and 13 <= r[y, x] <= 15
    ell = np.zeros((30, 30), bool)
    ell[0:30, 0:10] = True
    ell[20:30, 0:30] = True
    x, y = center_point(ell)
    assert ell[y, x]
    with pytest.raises(ValueError):
        center_point(np.zeros((4, 4), bool))
