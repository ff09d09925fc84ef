"""Shared fixtures of the training tests: a tiny model artifact and a small synthetic Label Studio export.

Imported by the other test modules (`sys.path` gets this folder); it holds no tests itself.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Sequence

import torch

REPO = Path(__file__).resolve().parents[2]
LABELS = ("circle", "square", "triangle", "star", "ring", "cross")

# Two cores shared with other processes: one thread per process avoids OpenMP contention (100x slower convs).
torch.set_num_threads(1)


def make_tiny_artifact(path: Path, labels: Sequence[str] = LABELS, seed: int = 0, version: str = "ovsam_tiny-test",
                       **config: Any) -> Path:
    """A random `tiny` OVSAM (with `config` overrides) and its own (random) text tower, saved as an artifact."""
    from ovsam.artifact import save_artifact
    from ovsam.random_model import build_random

    art = build_random("tiny", labels, seed, version, cache_dir=path.parent / "vocab-cache", **config)
    return save_artifact(path, art.model, art.vocabulary, version, {"source": "test"}, {}, text_encoder=art.text_encoder)


def make_synth(out: Path, num_images: int = 4, size: int = 128, seed: int = 0, **kwargs) -> Dict[str, Path]:
    """A synthetic data set (Label Studio export + COCO + label config) written by `training.synth`."""
    from training.synth import SynthConfig, write_dataset

    write_dataset(SynthConfig(out=out, num_images=num_images, width=size, height=size, seed=seed, **kwargs), progress=False)
    return {"tasks": out / "tasks.json", "coco": out / "coco.json", "config": out / "label_config.xml", "root": out}


def renamed_coco(data: Dict[str, Path], names: Dict[str, str], frequency: Dict[str, str] | None = None) -> Path:
    """The synthetic COCO file with its categories renamed (e.g. to COCO or LVIS classes), and LVIS frequencies."""
    import json

    coco = json.loads(Path(data["coco"]).read_text())
    for c in coco["categories"]:
        c["name"] = names[c["name"]]
        if frequency is not None:
            c["frequency"] = frequency[c["name"]]
    path = Path(data["root"]) / "renamed.json"
    path.write_text(json.dumps(coco))
    return path


def subprocess_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    return env

