"""`DistillConfig`: everything that decides a SAM2CLIP distillation run, free of torch.

Its own module so that `python -m training distill --help` (whose defaults come from here) and
argument errors answer without loading the model stack; `training.distill` runs the configuration.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple


@dataclass
class DistillConfig:
    images: List[str]
    features: str
    out: str  # the artifact to write
    base: Optional[str] = None
    config: Optional[str] = None
    work_dir: Optional[str] = None  # checkpoints and logs (default: <out without suffix>.run/)
    clip: Optional[str] = None  # open_clip weights for --config (file or tag; default the config's)
    sam_checkpoint: Optional[str] = None
    labels: Tuple[str, ...] = ("object",)
    recursive: bool = False
    val_fraction: float = 0.0
    epochs: int = 24
    max_steps: Optional[int] = None
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: Optional[int] = None
    final_factor: float = 0.01
    max_norm: Optional[float] = 5.0
    seed: int = 0
    device: Optional[str] = None
    amp: bool = True
    workers: int = 0
    resume: bool = False
    progress: bool = True
    tensorboard: bool = True
    version: Optional[str] = None
    command: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.base is None) == (self.config is None):
            raise ValueError("give exactly one of --base (artifact) or --config (preset name)")

    @property
    def run_dir(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.out).with_suffix(".run")
