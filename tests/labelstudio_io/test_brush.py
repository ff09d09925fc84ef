"""Our vectorised brush RLE must equal label_studio_sdk's encoder byte for byte and decode back."""
import cv2
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from labelstudio_io.brush import encode_brush


def _masks():
    rng = np.random.default_rng(0)
    yield np.zeros((3, 5), bool)
    yield np.ones((300, 300), bool)  # one run longer than 2**16 (cut into chunks)
    yield np.ones((128, 128), bool)  # 65536 values: exactly one full chunk
    yield rng.random((120, 160)) > 0.5  # many short runs, every size class
    yield rng.random((7, 9)) > 0.9
    disk = np.zeros((600, 800), np.uint8)
    cv2.circle(disk, (400, 300), 250, 1, -1)
    yield disk.astype(bool)


@pytest.mark.parametrize("mask", list(_masks()), ids=lambda m: f"{m.shape}-{int(m.sum())}")
def test_identical_to_sdk_and_round_trips(mask):
    ours = encode_brush(mask)
    assert ours == mask2rle(mask.astype(np.uint8) * 255)
    h, w = mask.shape
    decoded = np.reshape(decode_rle(ours), (h, w, 4))[:, :, 3]
    assert np.array_equal(decoded > 0, mask)


def test_uint8_masks_keep_their_values():
    mask = np.zeros((4, 6), np.uint8)
    mask[1:3, 2:5] = 255
    assert encode_brush(mask) == mask2rle(mask)
    with pytest.raises(ValueError):
        encode_brush(np.zeros((2, 2, 2), bool))
