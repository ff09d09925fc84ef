"""Promotion gate: refuses a worse model, accepts an equal one."""
from __future__ import annotations

import pytest

from training.gate import combined_score, decide


def metrics(box_miou, box_acc, center_miou=None, center_acc=None):
    m = {"prompt_modes": ["box"], "box": {"miou": box_miou, "accuracy": box_acc}}
    if center_miou is not None:
        m["prompt_modes"].append("center")
        m["center"] = {"miou": center_miou, "accuracy": center_acc}
    return m


def test_combined_score_is_the_mean_of_miou_and_accuracy_over_modes():
    assert combined_score(metrics(0.8, 0.6)) == pytest.approx(0.7)
    assert combined_score(metrics(0.8, 0.6, 0.4, 0.2)) == pytest.approx((0.7 + 0.3) / 2)
    assert combined_score({"prompt_modes": ["box"], "box": {"miou": None, "accuracy": None}}) is None


def test_gate_refuses_worse_accepts_equal_and_within_tolerance():
    serving = metrics(0.80, 0.70, 0.60, 0.50)
    assert decide(serving, serving).promote  # equal
    assert decide(metrics(0.80, 0.69, 0.60, 0.50), serving).promote  # 0.0025 worse: within 0.01
    worse = decide(metrics(0.70, 0.60, 0.55, 0.45), serving)
    assert not worse.promote and worse.serving_score > worse.candidate_score
    assert "<" in worse.reason
    assert not decide(metrics(0.80, 0.68, 0.60, 0.50), serving, tolerance=0.0).promote
    assert decide(metrics(0.1, 0.1), None).promote  # nothing served yet
    assert not decide({"prompt_modes": ["box"], "box": {"miou": None, "accuracy": None}}, serving).promote
    d = decide(serving, serving).to_dict()
    assert {"promote", "candidate_score", "serving_score", "tolerance", "reason", "rule"} <= set(d)
