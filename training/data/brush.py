"""Label Studio brush RLE <-> bool masks, with the checks the SDK's codec does not make.

The SDK decoder trusts its input: a wrong header can ask for gigabytes, and a short stream
raises a bare ValueError. Exports come from users, so we check before decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle

_HEADER_BYTES = 5  # 32-bit length, 5-bit word size, 4 x 4-bit run classes = 53 bits


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


def encode_brush(mask: np.ndarray) -> list[int]:
    """Encode a bool HxW mask the way the Label Studio editor does (0/255 in every channel)."""
    return [int(v) for v in mask2rle(np.asarray(mask, dtype=bool).astype(np.uint8) * 255)]
