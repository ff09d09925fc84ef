"""RoI level rule, per-level aligned RoIAlign, mmdet's mask2bbox and the cosine classifier."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

import ovsam
from ovsam.head import cosine_logits
from ovsam.roi import boxes_to_rois, map_roi_levels, mask_occupancy, masks_to_boxes_exclusive, multi_level_roi_align


STRIDES = (4, 8, 16, 32)


def _square_rois(sides):
    rois = torch.zeros(len(sides), 5)
    rois[:, 1] = 5.0
    rois[:, 2] = 7.0
    rois[:, 3] = 5.0 + torch.tensor(sides, dtype=torch.float32)
    rois[:, 4] = 7.0 + torch.tensor(sides, dtype=torch.float32)
    return rois


@pytest.mark.parametrize(
    "side, level",
    [
        (0.0, 0),
        (1.0, 0),  # tiny
        (56.0, 0),
        (111.9, 0),
        (112.0, 1),
        (223.9, 1),
        (224.0, 2),
        (447.9, 2),
        (448.0, 3),
        (895.9, 3),
        (1e5, 3),  # huge: clamped to the coarsest level
    ],
)
def test_level_rule_boundaries(side, level):
    assert map_roi_levels(_square_rois([side]), 4, 56.0).tolist() == [level]


def test_level_rule_epsilon_sits_inside_the_log_and_is_1e_6_wide():
    # mmdet: floor(log2(s / 56 + 1e-6)). The epsilon lifts scales a hair below 112 (s/56 in [2 - 1e-6, 2)) to
    # level 1 and no others. Checked in float64, where every step of the rule is exact to ~1e-16 on any CPU,
    # with margins of >= 2e-7 around the edges, so no machine's rounding can move a result. 2 - 1.2e-6 tells
    # it from an epsilon added after the log2 (which absorbs down to 2 - 1.39e-6), 2 - 3e-6 from
    # torchvision's LevelMapper (epsilon on s/224: absorbs down to 2 - 4e-6).
    def square(side: float) -> torch.Tensor:
        return torch.tensor([[0.0, 3.0, 5.0, 3.0 + side, 5.0 + side]], dtype=torch.float64)

    for ratio, level in [(2 - 0.2e-6, 1), (2 - 0.8e-6, 1), (2 - 1.2e-6, 0), (2 - 3e-6, 0), (4 - 0.5e-6, 2), (4 - 2.5e-6, 1)]:
        assert map_roi_levels(square(56.0 * ratio), 4, 56.0).tolist() == [level], ratio


def test_level_rule_float32_boundary_box_gets_level_1_on_any_cpu():
    # Sides 112 and 112 - 1 ulp (float32 values, so exactly what the model gets): the true scale is
    # 112 - 3.8e-6, within the epsilon. Whether a CPU's float32 sqrt/log2 rounds it to 112 or just below,
    # the rule must say level 1 (without the epsilon, the rounded-below case would say 0).
    below = float(np.nextafter(np.float32(112.0), np.float32(0.0)))
    rois = torch.tensor([[0, 16.0, 0.0, 128.0, below], [0, 0.0, 0.0, below, below]], dtype=torch.float32)
    assert map_roi_levels(rois, 4, 56.0).tolist() == [1, 1]


def test_level_rule_uses_geometric_mean_of_sides():
    # 224 x 56 -> sqrt = 112 -> level 1; 448 x 111 -> sqrt < 224 -> level 1; 448 x 112 -> 224 -> level 2.
    rois = torch.tensor([[0, 0, 0, 224, 56], [0, 10, 20, 458, 131], [0, 10, 20, 458, 132]], dtype=torch.float32)
    assert map_roi_levels(rois, 4, 56.0).tolist() == [1, 1, 2]


def test_level_rule_other_finest_scale_and_levels():
    rois = _square_rois([27.9, 28.0, 56.0, 112.0, 1000.0])
    assert map_roi_levels(rois, 4, 14.0).tolist() == [0, 1, 2, 3, 3]
    assert map_roi_levels(rois, 2, 14.0).tolist() == [0, 1, 1, 1, 1]


def test_level_rule_matches_mmdet_formula_on_random_boxes():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=g) * 500
    wh = torch.rand(500, 2, generator=g) ** 2 * 900
    rois = torch.cat([torch.zeros(500, 1), xy, xy + wh], dim=1)
    expected = []
    for r in rois.tolist():
        s = math.sqrt((r[3] - r[1]) * (r[4] - r[2]))
        expected.append(min(3, max(0, math.floor(math.log2(s / 56.0 + 1e-6)))))
    got = map_roi_levels(rois, 4, 56.0).tolist()
    mismatch = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    assert not mismatch, (rois[mismatch[:3]], [got[i] for i in mismatch[:3]])
    assert set(got) == {0, 1, 2, 3}


def _pyramid(batch=2, channels=3, size=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, size // s, size // s, generator=g) for s in STRIDES]


def test_multi_level_roi_align_equals_torchvision_on_chosen_level():
    feats = _pyramid()
    rois = torch.tensor(
        [
            [0, 10.3, 20.7, 60.2, 90.1],  # ~61 -> level 0
            [1, 100.0, 50.0, 250.0, 200.0],  # 150 -> level 1
            [0, 0.0, 0.0, 300.0, 300.0],  # 300 -> level 2
            [1, 20.0, 30.0, 1000.0, 900.0],  # ~922 -> level 3
            [1, 3.5, 4.5, 5.5, 6.5],  # tiny -> level 0
            [0, 400.0, 400.0, 512.0, 512.0],  # 112 -> level 1 (boundary)
            [0, 0.0, 0.0, 0.0, 0.0],  # empty box -> level 0
        ]
    )
    levels = map_roi_levels(rois, 4, 56.0)
    assert levels.tolist() == [0, 1, 2, 3, 0, 1, 0]
    out = multi_level_roi_align(feats, rois, 7, STRIDES, 56.0)
    assert tuple(out.shape) == (7, 3, 7, 7)
    for i, lvl in enumerate(levels.tolist()):
        expected = roi_align(feats[lvl], rois[i : i + 1], 7, spatial_scale=1.0 / STRIDES[lvl], sampling_ratio=0, aligned=True)
        torch.testing.assert_close(out[i : i + 1], expected, rtol=0, atol=0)
        # aligned=False (torchvision's MultiScaleRoIAlign) would give something else.
        if i < 4:
            unaligned = roi_align(feats[lvl], rois[i : i + 1], 7, spatial_scale=1.0 / STRIDES[lvl], sampling_ratio=0, aligned=False)
            assert not torch.allclose(out[i : i + 1], unaligned)


def test_multi_level_roi_align_respects_batch_index():
    feats = _pyramid(seed=1)
    box = torch.tensor([[30.0, 40.0, 80.0, 100.0]])
    a = multi_level_roi_align(feats, boxes_to_rois(box, 0), 4, STRIDES)
    b = multi_level_roi_align(feats, boxes_to_rois(box, 1), 4, STRIDES)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(
        b, roi_align(feats[0][1:], boxes_to_rois(box, 0), 4, spatial_scale=0.25, sampling_ratio=0, aligned=True)
    )


def test_boxes_to_rois():
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    torch.testing.assert_close(boxes_to_rois(boxes), torch.tensor([[0, 1, 2, 3, 4], [0, 5, 6, 7, 8.0]]))
    torch.testing.assert_close(boxes_to_rois(boxes, torch.tensor([1, 0]))[:, 0], torch.tensor([1.0, 0.0]))


# ---- mask2bbox --------------------------------------------------------------------------------


def test_masks_to_boxes_exclusive():
    masks = torch.zeros(5, 6, 10, dtype=torch.bool)
    masks[0, 2:5, 3:8] = True  # rows 2..4, cols 3..7
    masks[1, 0, 0] = True  # single pixel
    # masks[2] empty
    masks[3] = True  # full
    masks[4, 1, 9] = True
    masks[4, 5, 2] = True  # two separate pixels
    boxes = masks_to_boxes_exclusive(masks)
    assert boxes.dtype == torch.float32
    expected = torch.tensor(
        [[3, 2, 8, 5], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 10, 6], [2, 1, 10, 6]], dtype=torch.float32
    )
    torch.testing.assert_close(boxes, expected, rtol=0, atol=0)


def test_masks_to_boxes_exclusive_matches_numpy_on_random_masks():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(20, 13, 17, generator=g) > 0.97
    masks[0] = False
    boxes = masks_to_boxes_exclusive(masks)
    for m, b in zip(masks.numpy(), boxes.numpy()):
        ys, xs = np.nonzero(m)
        exp = [0, 0, 0, 0] if len(xs) == 0 else [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert b.tolist() == [float(v) for v in exp]


def test_masks_to_boxes_exclusive_all_empty():
    assert torch.equal(masks_to_boxes_exclusive(torch.zeros(3, 4, 4, dtype=torch.bool)), torch.zeros(3, 4))


# ---- cosine classifier -------------------------------------------------------------------------


def test_logit_scale_is_exp_4_6052():
    scale = ovsam.get_config("rn50x16").logit_scale
    assert scale == pytest.approx(math.exp(4.6052), rel=1e-12)
    assert scale == pytest.approx(100.003, abs=1e-4)
    assert scale != 100.0


def test_cosine_logits_background_zero_scale_and_max_over_prototypes():
    scale = ovsam.get_config("rn50x16").logit_scale
    d = 4
    e = torch.eye(d)
    # class 0: prototypes e0, e1; class 1: prototypes e2, (e2+e3)/sqrt2; class 2: -e0, e3
    text = torch.stack(
        [
            torch.stack([e[0], e[1]]),
            torch.stack([e[2], (e[2] + e[3]) / math.sqrt(2)]),
            torch.stack([-e[0], e[3]]),
        ]
    )
    feats = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0], [1.0, 1.0, 0.0, 0.0]])
    logits = cosine_logits(feats, text, scale)
    assert tuple(logits.shape) == (3, 4)
    assert torch.all(logits[:, -1] == 0.0)
    # feature along e0: class 0 max(1, 0)=1; class 1 max(0,0)=0; class 2 max(-1,0)=0
    # feature along e3: class 0 0; class 1 max(0, 1/sqrt2); class 2 max(0, 1) = 1
    # feature (e0+e1)/sqrt2: class 0 max(1/sqrt2, 1/sqrt2); class 1 0; class 2 max(-1/sqrt2, 0)=0
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[1, 0, 0, 0], [0, r, 1, 0], [r, 0, 0, 0]], dtype=torch.float32) * scale
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-4)
    assert logits[0, 0].item() == pytest.approx(100.003, abs=1e-4)


def test_cosine_logits_matches_numpy():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 8, generator=g)
    text = F.normalize(torch.randn(5, 3, 8, generator=g), dim=-1)
    got = cosine_logits(feats, text, 100.0).numpy()
    f = feats.numpy() / np.linalg.norm(feats.numpy(), axis=1, keepdims=True)
    cos = np.einsum("nd,kpd->nkp", f, text.numpy()).max(axis=2)
    np.testing.assert_allclose(got[:, :5], 100.0 * cos, rtol=1e-5, atol=1e-4)
    assert (got[:, 5] == 0).all()


def test_mask_occupancy_is_the_share_of_each_bin_the_mask_covers():
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 0:8, 0:4] = True  # left half of the box [0, 0, 8, 8]
    masks[1, 0:8, 0:8] = True
    rois = torch.tensor([[0.0, 0.0, 0.0, 8.0, 8.0]])
    left = mask_occupancy(masks, rois, 2, 1.0, mask_index=torch.tensor([0]))
    torch.testing.assert_close(left[0, 0], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    full = mask_occupancy(masks, rois, 2, 1.0, mask_index=torch.tensor([1]))
    torch.testing.assert_close(full[0, 0], torch.ones(2, 2))
    # A stride-4 mask (SAM's low-res logits) read with the input-pixel RoI: its first column is the box's left quarter.
    low = torch.zeros(1, 4, 4, dtype=torch.bool)
    low[0, :, 0] = True
    quarter = mask_occupancy(low, torch.tensor([[0.0, 0.0, 0.0, 16.0, 16.0]]), 4, 0.25)
    torch.testing.assert_close(quarter[0, 0], torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 4))
