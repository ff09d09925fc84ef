"""The evaluation's centre point as the reference computes it (kornia 0.7.x distance-transform cascade)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovsam.centre import centre_point, chessboard_depth, reference_rescale_size, rescale_mask
from ovsam.reference_check import GoldenSet

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "reference_golden"


@pytest.fixture(scope="module")
def golden() -> GoldenSet:
    return GoldenSet.load(GOLDEN_DIR)


def _centre_results(golden: GoldenSet, version: str):
    return golden.meta["centre"]["results"][version]["points"]


@pytest.mark.parametrize("version", ["kornia071", "kornia090"])
def test_golden_centre_points(golden, version):
    """20 masks (ties, rings, lines, a single pixel, borders, other frames): the reference's points exactly."""
    expected = golden[f"centre.points_{version}"]
    got = [centre_point(golden[f"centre.rescaled_{i:02d}"].numpy()) for i in range(expected.shape[0])]
    kinds = golden.meta["centre"]["kinds"]
    wrong = [(kinds[i], got[i], tuple(expected[i].tolist())) for i in range(len(got)) if got[i] != tuple(expected[i].tolist())]
    assert not wrong


def test_mask_rescale_follows_mmcv_imrescale(golden):
    for i, entry in enumerate(_centre_results(golden, "kornia071")):
        mask = golden[f"centre.mask_{i:02d}"].numpy()
        assert list(mask.shape) == entry["ori_shape"]
        got = rescale_mask(mask, tuple(entry["img_shape"]))
        expected = golden[f"centre.rescaled_{i:02d}"].numpy().astype(bool)
        assert got.shape == expected.shape == tuple(entry["rescaled_mask_shape"]), i
        assert np.array_equal(got, expected), i
    assert reference_rescale_size(27, 35, (197, 256)) == (197, 255)  # a pixel short of img_shape (docs/REFERENCE_NOTES.md B10)


def _cascade(mask: np.ndarray, new_offsets: bool) -> np.ndarray:
    """kornia's distance_transform cascade on the padded inverse mask, written from its description, in float64:
    per ring, filter the reached set with exp(-|d|/h) (replicate border), -h log, keep where positive."""
    h = 0.35
    reached = torch.from_numpy(~np.pad(mask, 1)).double()[None, None]  # padded with background
    yy, xx = torch.meshgrid(torch.arange(3.0), torch.arange(3.0), indexing="ij")
    kernel = torch.exp(-torch.hypot(yy - 1, xx - 1).double() / h)[None, None]
    out = torch.zeros_like(reached)
    for i in range(max(reached.shape[-2:])):
        s = F.conv2d(F.pad(reached, (1, 1, 1, 1), mode="replicate"), kernel)
        cdt = torch.nan_to_num(-h * torch.log(s), posinf=0.0)
        ring = cdt > 0
        if not ring.any():
            break
        offset = i if new_offsets else i * 3 // 2
        out = out + (offset + cdt) * ring
        reached = torch.where(ring, torch.ones_like(reached), reached)
    return out[0, 0, 1:-1, 1:-1].numpy()


def _first_max(values: np.ndarray) -> tuple:
    """First raster index within 1e-9 of the maximum: exact-arithmetic ties, whatever order the sums took."""
    idx = int(np.flatnonzero(values.ravel() >= values.max() - 1e-9)[0])
    return idx % values.shape[1], idx // values.shape[1]


def _random_mask(rng: np.random.Generator) -> np.ndarray:
    h, w = rng.integers(6, 40, size=2)
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.zeros((h, w), bool)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(1, h / 2 + 1), rng.uniform(1, w / 2 + 1)
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    if rng.random() < 0.3:
        mask[rng.integers(0, h), :] ^= True  # thin lines and holes
    return mask


@pytest.mark.parametrize("new_offsets", [False, True])
def test_centre_point_equals_the_cascade_argmax_on_random_masks(new_offsets):
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        mask = _random_mask(rng)
        if not mask.any():
            continue
        assert centre_point(mask) == _first_max(_cascade(mask, new_offsets))
        checked += 1
    assert checked >= 50


def test_centre_point_edge_cases():
    assert centre_point(np.zeros((5, 7), bool)) == (0, 0)  # the reference's all-zero map: index 0
    one = np.zeros((5, 7), bool)
    one[3, 6] = True
    assert centre_point(one) == (6, 3)
    full = np.ones((9, 9), bool)
    assert centre_point(full) == (4, 4)
    with pytest.raises(ValueError):
        centre_point(np.ones((2, 2, 2), bool))


def test_chessboard_depth_counts_the_border_as_background():
    depth = chessboard_depth(np.ones((5, 6), bool))
    assert depth[0].tolist() == [1] * 6 and depth[2].tolist() == [1, 2, 3, 3, 2, 1]
    assert depth.max() == 3
