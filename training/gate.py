"""Promotion gate: a fine-tuned model replaces the served one only if it is not worse on held-out data.

The single figure compared is the **combined score** = mean over the evaluated prompt modes (GT box
and centre point) of (mIoU + accuracy) / 2, both as fractions in [0, 1], micro-averaged over the
validation instances (spec §4). Candidate and serving model are evaluated on the same images with the
same project vocabulary. The candidate is promoted when

    candidate_score >= serving_score - tolerance        (default tolerance 0.01)

so an equal model is accepted (fresh annotations are worth serving) and a clearly worse one refused.
With no serving model to compare against, the candidate is promoted.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

DEFAULT_TOLERANCE = 0.01
PROMPT_MODES = ("box", "center")


def combined_score(metrics: Dict[str, Any]) -> Optional[float]:
    """Mean of (mIoU + accuracy) / 2 over the prompt modes present in an evaluation's metrics."""
    parts = []
    for mode in metrics.get("prompt_modes", PROMPT_MODES):
        m = metrics.get(mode) or {}
        if m.get("miou") is not None and m.get("accuracy") is not None:
            parts.append(0.5 * (m["miou"] + m["accuracy"]))
    return sum(parts) / len(parts) if parts else None


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    candidate_score: Optional[float]
    serving_score: Optional[float]
    tolerance: float
    reason: str

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "rule": "candidate_score >= serving_score - tolerance; "
                                          "score = mean over prompt modes of (mIoU + accuracy) / 2"}


def decide(candidate: Dict[str, Any], serving: Optional[Dict[str, Any]],
           tolerance: float = DEFAULT_TOLERANCE) -> GateDecision:
    """Compare two evaluations (the `metrics` dicts of `training.evaluate`)."""
    cand = combined_score(candidate)
    if cand is None:
        return GateDecision(False, None, None, tolerance, "the candidate has no evaluation (no validation instances)")
    serv = combined_score(serving) if serving else None
    if serv is None:
        return GateDecision(True, cand, None, tolerance, "no serving model to compare with")
    if cand >= serv - tolerance:
        return GateDecision(True, cand, serv, tolerance, f"score {cand:.4f} >= serving {serv:.4f} - {tolerance}")
    return GateDecision(False, cand, serv, tolerance, f"score {cand:.4f} < serving {serv:.4f} - {tolerance}")


# ------------------------------------------------------------------------------------- registration

Registrar = Callable[[Path, Path], Path]


def registry_add(model_dir: Path, artifact: Path) -> Path:
    """Store `artifact` as MODEL_DIR/versions/<version>.safetensors through the backend's registry, without
    touching `current`: the backend loads the new model first, then promotes it and swaps it in."""
    from labelstudio_backend.registry import ModelRegistry

    return ModelRegistry(model_dir).add(artifact)


def registry_promote(model_dir: Path, artifact: Path) -> Path:
    """Register and serve `artifact` through the backend's registry (versions/<version>.safetensors +
    the atomically written `current` pointer); returns its path inside MODEL_DIR."""
    from labelstudio_backend.registry import ModelRegistry

    return ModelRegistry(model_dir).promote(artifact)


def serving_artifact(model_dir: Path) -> Optional[Path]:
    """The version MODEL_DIR currently serves, if any."""
    from labelstudio_backend.registry import ModelRegistry

    return ModelRegistry(model_dir).current()


def register(model_dir: str | os.PathLike, artifact: str | os.PathLike, decision: GateDecision,
             registrar: Registrar = registry_promote) -> Optional[Path]:
    """Register when the gate says so (`registry_promote`: stored and served; `registry_add`: stored only);
    the registrar is swappable (tests, other registries)."""
    if not decision.promote:
        return None
    return registrar(Path(model_dir), Path(artifact))
