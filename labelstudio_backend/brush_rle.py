"""Label Studio brush RLE, vectorised.

`label_studio_sdk.converter.brush.mask2rle` defines the format (and stays the reference in the tests: the
output here is byte-identical), but it builds a Python string bit by bit, which costs ~250 ms on a 4000x3000
mask: more than the rest of a click. This encodes the same runs with NumPy.
"""
from __future__ import annotations

from typing import List

import numpy as np

_MAX_RUN = 2**16
# (upper length bound, class index, length bits) of the SDK's run-size classes [3, 4, 8, 16]
_CLASSES = ((8, 0, 3), (16, 1, 4), (256, 2, 8), (_MAX_RUN, 3, 16))


def _fields_to_bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate each value's lowest `width` bits, most significant first (widths <= 32)."""
    shifts = np.arange(31, -1, -1, dtype=np.uint64)
    bits = ((values.astype(np.uint64)[:, None] >> shifts) & 1).astype(np.uint8)
    keep = np.arange(32)[None, :] >= (32 - widths)[:, None]
    return bits[keep]


def mask_to_brush_rle(mask: np.ndarray) -> List[int]:
    """HxW mask (bool, or uint8 0..255) -> Label Studio brush RLE bytes, as `mask2rle(mask)` gives them."""
    if mask.ndim != 2:
        raise ValueError("mask must be 2-D")
    values = mask.astype(np.uint8) * 255 if mask.dtype == bool else mask.astype(np.uint8)
    flat = values.ravel()
    n = flat.size * 4  # every pixel is written as RGBA
    header_vals = [n, 7, 2, 3, 7, 15]  # length, wordsize-1, run sizes-1 (3, 4, 8, 16)
    header_widths = [32, 5, 4, 4, 4, 4]
    if flat.size:
        starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
        lengths = np.diff(np.r_[starts, flat.size]).astype(np.int64) * 4
        run_values = flat[starts].astype(np.int64)
        # Runs over 2**16 are cut into full 2**16 chunks plus the rest (a rest of 0 is not emitted).
        full = np.where(lengths > _MAX_RUN, (lengths - 1) // _MAX_RUN, 0)
        reps = full + 1
        run_values = np.repeat(run_values, reps)
        last = np.cumsum(reps) - 1
        lengths_out = np.full(int(reps.sum()), _MAX_RUN, dtype=np.int64)
        lengths_out[last] = lengths - full * _MAX_RUN
        cls = np.searchsorted(np.array([c[0] for c in _CLASSES]), lengths_out)
        len_bits = np.array([c[2] for c in _CLASSES])[cls]
        flag = (lengths_out > 1).astype(np.int64)
        k = len(lengths_out)
        vals = np.stack([flag, cls, lengths_out - 1, run_values], axis=1).ravel()
        widths = np.stack([np.ones(k, np.int64), np.full(k, 2), len_bits, np.full(k, 8)], axis=1).ravel()
        vals = np.r_[np.array(header_vals, np.int64), vals]
        widths = np.r_[np.array(header_widths, np.int64), widths]
    else:
        vals, widths = np.array(header_vals, np.int64), np.array(header_widths, np.int64)
    bits = _fields_to_bits(vals, widths)
    pad = 8 - bits.size % 8  # the SDK always pads, a whole zero byte when already aligned
    bits = np.r_[bits, np.zeros(pad, np.uint8)]
    return np.packbits(bits).tolist()
