"""Where a trained model came from: its version name, the code's commit, and a fine-tuning run's provenance.

Shared by fine-tuning, the backend's training jobs (which name the version before training) and distillation.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

if TYPE_CHECKING:
    from ovsam.artifact import ModelArtifact
    from training.dataset import TrainingData
    from training.distributed import DistInfo
    from training.finetune_config import FinetuneConfig


def make_version(base_version: str, when: Optional[datetime] = None) -> str:
    """`<base>-ft-<UTC timestamp>`; a base that is itself fine-tuned keeps only its root name."""
    root = re.sub(r"-ft-\d{8}T\d{6}Z(-\d+)?$", "", base_version)
    stamp = (when or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    return f"{root}-ft-{stamp}"


def git_commit() -> Optional[str]:
    """The checkout's commit, or None outside a git checkout (an installed copy)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def finetune_provenance(cfg: FinetuneConfig, base: ModelArtifact, data: TrainingData, info: DistInfo,
                        n_train: int, n_val: int, steps: int) -> Dict[str, Any]:
    """The artifact's provenance of a fine-tuning run: base, data, command, commit and hyperparameters."""
    return {
        "kind": "clip2sam-finetune",
        "base_model": str(cfg.base),
        "base_version": base.version,
        "data": data.source,
        "data_hash": data.data_hash,
        "train_images": n_train,
        "val_images": n_val,
        "skipped": data.report.as_dict(),
        "labels": list(data.labels),
        "command": cfg.command or " ".join(sys.argv),
        "git_commit": git_commit(),
        "epochs": cfg.epochs,
        "steps": steps,
        "seed": cfg.seed,
        "world_size": info.world_size,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hyperparameters": {k: v for k, v in dataclasses.asdict(cfg).items()
                            if k not in ("base", "out", "data", "label_config", "command")},
    }
