"""Label Studio brush RLE <-> masks: the project's one encoder and one decoder.

`label_studio_sdk.converter.brush.mask2rle` defines the format (and stays the reference in the tests: the
output here is byte-identical), but it builds a Python string bit by bit, which costs ~250 ms on a 4000x3000
mask: more than the rest of a click. This encodes the same runs with NumPy.

The SDK's decoder trusts its input: a wrong header can ask for gigabytes, and a short stream raises a bare
ValueError. Exports come from users, so `decode_brush` checks before decoding.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from label_studio_sdk.converter.brush import decode_rle

_HEADER_BYTES = 5  # 32-bit length, 5-bit word size, 4 x 4-bit run classes = 53 bits
_MAX_RUN = 2**16
# (upper length bound, class index, length bits) of the SDK's run-size classes [3, 4, 8, 16]
_CLASSES = ((8, 0, 3), (16, 1, 4), (256, 2, 8), (_MAX_RUN, 3, 16))


def _fields_to_bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate each value's lowest `width` bits, most significant first (widths <= 32)."""
    shifts = np.arange(31, -1, -1, dtype=np.uint64)
    bits = ((values.astype(np.uint64)[:, None] >> shifts) & 1).astype(np.uint8)
    keep = np.arange(32)[None, :] >= (32 - widths)[:, None]
    return bits[keep]


def encode_brush(mask: np.ndarray) -> list[int]:
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


class BrushDecodeError(ValueError):
    """The RLE is not a brush mask of the expected size."""


def rle_length(rle: Sequence[int]) -> int:
    """Number of RGBA values the stream says it holds (its 32-bit header)."""
    if len(rle) < _HEADER_BYTES:
        raise BrushDecodeError("RLE shorter than its header")
    return int.from_bytes(bytes(rle[:4]), "big")


def decode_brush(rle: Sequence[int], width: int, height: int) -> np.ndarray:
    """Decode to a bool HxW mask (alpha channel > 0, as Label Studio draws it)."""
    if not all(isinstance(v, int) and 0 <= v <= 255 for v in rle):
        raise BrushDecodeError("RLE values must be integers 0..255")
    expected = width * height * 4
    found = rle_length(rle)
    if found != expected:
        raise BrushDecodeError(f"RLE holds {found} values, {width}x{height}x4 = {expected} expected")
    try:
        flat = decode_rle(list(rle))
    except (ValueError, IndexError) as exc:  # the stream ends before its runs do
        raise BrushDecodeError(f"RLE stream is truncated: {exc}") from exc
    return flat.reshape(height, width, 4)[:, :, 3] > 0
