"""Promotion gate: a fine-tuned model replaces the served one only if it is not worse on held-out data.

The single figure compared is the **combined score** = mean over the evaluated prompt modes (GT box
and centre point) of (mIoU + accuracy) / 2, both as fractions in [0, 1], micro-averaged over the
validation instances (how the paper reports mIoU and recognition accuracy). Candidate and serving model are evaluated on the same images with the
same project vocabulary. The candidate is promoted when

    candidate_score >= serving_score - tolerance        (default tolerance 0.01)

so an equal model is accepted (fresh annotations are worth serving) and a clearly worse one refused.
With no serving model to compare against, the candidate is promoted.

The decision is all this module gives: registering and serving a candidate is the backend's (it reads the
decision from the training job's outcome file), so training never imports the backend.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

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
