"""Open-Vocabulary SAM in plain PyTorch: click or box in, mask and class name out.

The names below are imported on first use, so `python -m ovsam --help` (which imports this package)
does not load torch, open_clip and segment_anything.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"OVSAM": ".model", "ImageFeatures": ".model", "OVSAMConfig": ".config", "get_config": ".config"}

__all__ = ["OVSAM", "OVSAMConfig", "ImageFeatures", "get_config"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
