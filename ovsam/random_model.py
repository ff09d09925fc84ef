"""`build_random`: a randomly initialised OVSAM with its text tower and a vocabulary, as one `ModelArtifact`.

The one factory behind `python -m ovsam init`, the backend's untrained fallback, the demo model's starting
point, the benchmarks' and the tests' tiny models: the same config and seed give the same weights everywhere.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch

from .artifact import ModelArtifact
from .config import OVSAMConfig, get_config
from .model import OVSAM
from .text import load_pretrained_text_encoder
from .vocabulary import VocabularyBuilder


def build_random(
    config: Union[str, OVSAMConfig] = "tiny",
    labels: Sequence[str] = ("object",),
    seed: int = 0,
    version: Optional[str] = None,
    provenance: Optional[Dict[str, Any]] = None,
    cache_dir: Optional[Path] = None,
    base_labels: Optional[Sequence[str]] = None,
    **overrides: Any,
) -> ModelArtifact:
    """Model and text tower drawn from `seed` (without touching the caller's random state), in eval mode.

    `config`: a preset name (with `overrides`) or a config. The text tower is random for the presets with their
    own tower (`tiny`, `demo`) and open_clip's pretrained one for the official presets. The vocabulary of `labels`
    is base on `base_labels` (default: all), embedded by that tower with the disk cache in `cache_dir`.
    """
    cfg = get_config(config, **overrides) if isinstance(config, str) else config.replace(**overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OVSAM(cfg).eval()
        text = load_pretrained_text_encoder(cfg).eval()
    vocabulary = VocabularyBuilder(text, cache_dir).build(list(labels), base_labels=base_labels)
    provenance = {"kind": "random-init", "config": cfg.name, "seed": seed, **(provenance or {})}
    return ModelArtifact(model, vocabulary, version or f"{cfg.name}-init", provenance, {}, text, None)
