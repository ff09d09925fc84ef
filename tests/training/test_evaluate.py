"""Evaluation: the paper's per-instance metric on a hand-made case, the report files, and the CLI."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_finetune_support import make_synth, make_tiny_artifact, renamed_coco  # noqa: E402

from ovsam.transforms import ImageFrame  # noqa: E402
from training.data.types import Instance, Sample  # noqa: E402
from training.evaluate import center_prompt, evaluate_predictor, main_evaluate, write_report  # noqa: E402


def rows(a: int, b: int) -> np.ndarray:
    m = np.zeros((20, 20), bool)
    m[a:b] = True
    return m


@dataclass
class FakeFeatures:
    frame: ImageFrame


@dataclass
class FakePrediction:
    mask: np.ndarray
    label: str


class FakeVocabulary:
    labels = ["cat", "dog"]


class FakePredictor:
    """Known answers: box prompts get cat's mask right (label right) and half of dog's (label wrong);
    centre points miss cat entirely (label wrong) and get dog exactly (label right)."""

    vocabulary = FakeVocabulary()

    def __init__(self) -> None:
        self.points = []

    def set_image(self, image):
        return FakeFeatures(ImageFrame.for_image(20, 20, 128))

    def predict_batch(self, prompts, features=None, top_k=1):
        out = []
        for p in prompts:
            if p.box is not None:
                top = p.box[1] < 10
                out.append(FakePrediction(rows(0, 10), "cat") if top else FakePrediction(rows(10, 15), "cat"))
            else:
                self.points.append(p.points[0])
                top = p.points[0][1] < 10
                out.append(FakePrediction(np.zeros((20, 20), bool), "dog") if top else FakePrediction(rows(10, 20), "dog"))
        return out


class FakeImages:
    def load(self, ref):
        return np.zeros((20, 20, 3), np.uint8)


def hand_made_samples():
    cat = Instance("cat", rows(0, 10), np.array([0, 0, 20, 10], np.float32), "brush")
    dog = Instance("dog", rows(10, 20), np.array([0, 10, 20, 20], np.float32), "brush")
    box_only = Instance("dog", None, np.array([0, 0, 5, 5], np.float32), "rectangle")
    bird = Instance("bird", rows(0, 2), np.array([0, 0, 20, 2], np.float32), "brush")
    return [Sample(1, "a.png", [cat, dog, box_only, bird], 20, 20)]


def test_metrics_on_a_hand_made_case(tmp_path):
    predictor = FakePredictor()
    result = evaluate_predictor(predictor, hand_made_samples(), FakeImages(), novel_labels=["dog"], max_examples=2)
    m = result.metrics
    assert m["box"]["count"] == 2 and m["num_images"] == 1 and m["num_instances"] == 2
    assert m["box"]["miou"] == pytest.approx(0.75) and m["box"]["accuracy"] == pytest.approx(0.5)
    assert m["center"]["miou"] == pytest.approx(0.5) and m["center"]["accuracy"] == pytest.approx(0.5)
    assert m["box"]["base_miou"] == pytest.approx(1.0) and m["box"]["novel_miou"] == pytest.approx(0.5)
    assert m["box"]["base_accuracy"] == 1.0 and m["box"]["novel_accuracy"] == 0.0
    assert m["center"]["per_class"]["dog"] == {"count": 1, "accuracy": 1.0, "miou": pytest.approx(1.0)}
    assert m["skipped"] == {"label not in vocabulary": 1, "no mask (box only)": 1}
    assert m["score"] == pytest.approx(((0.75 + 0.5) / 2 + (0.5 + 0.5) / 2) / 2)
    assert sorted(result.ious["box"]) == pytest.approx([0.5, 1.0])
    for x, y in predictor.points:  # centre points lie inside their masks
        assert 0 <= x < 20 and (y < 10) in (True, False)

    files = write_report(result, tmp_path / "eval", title="hand-made")
    for f in files.values():
        assert f.exists() and f.stat().st_size > 0
    assert json.loads(files["metrics"].read_text())["box"]["miou"] == pytest.approx(0.75)
    report = files["report"].read_text()
    assert "| box | 75.0 | 50.0 |" in report and "| dog | 1 |" in report and "examples.png" in report


def test_center_prompt_is_the_deepest_pixel_in_original_pixels():
    mask = np.zeros((40, 80), bool)
    mask[5:35, 25:55] = True  # a square: one deepest point (a rectangle has a ridge; the first maximum wins)
    frame = ImageFrame.for_image(40, 80, 128)  # x1.6
    (x, y), = center_prompt(mask, frame)
    assert mask[int(y), int(x)]
    assert abs(x - 39.5) < 1.5 and abs(y - 19.5) < 1.5


def test_cli_writes_metrics_report_and_plots(tmp_path):
    art = make_tiny_artifact(tmp_path / "tiny.safetensors")
    data = make_synth(tmp_path / "synth", num_images=2)
    out = tmp_path / "eval"
    code = main_evaluate(["--model", str(art), "--data", str(data["coco"]), "--base-labels", "circle,square,triangle",
                          "--out", str(out), "--no-progress", "--cache-dir", str(tmp_path / "vocab-cache")])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["prompt_modes"] == ["box", "center"] and m["num_images"] == 2
    assert m["box"]["count"] == m["num_instances"] > 0
    assert m["novel_labels"] == ["cross", "ring", "star"]
    assert 0.0 <= m["box"]["miou"] <= 1.0 and m["model_version"] == "ovsam_tiny-test"
    for name in ("report.md", "per_class_accuracy.png", "iou_histogram.png", "examples.png"):
        assert (out / name).stat().st_size > 0


def test_cli_reference_coco_vocabulary_scores_the_65_classes_and_keeps_the_15_in_the_classifier(tmp_path):
    from ovsam.class_texts import coco_reference_vocabulary

    art = make_tiny_artifact(tmp_path / "tiny.safetensors")
    data = make_synth(tmp_path / "synth", num_images=3)
    names = {"circle": "person", "square": "cat", "triangle": "teddy bear", "star": "dog", "ring": "car",
             "cross": "hair drier"}  # base, novel, excluded, novel, base, excluded
    path = renamed_coco(data, names)
    coco = json.loads(path.read_text())
    excluded_ids = {c["id"] for c in coco["categories"] if c["name"] in ("teddy bear", "hair drier")}
    scored = sum(1 for a in coco["annotations"] if a["category_id"] not in excluded_ids)
    out = tmp_path / "eval"
    assert main_evaluate(["--model", str(art), "--data", str(path), "--prompt", "box",
                          "--reference-vocabulary", "coco", "--out", str(out), "--no-progress",
                          "--cache-dir", str(tmp_path / "vocab-cache")]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["box"]["count"] == scored > 0 and scored < len(coco["annotations"])
    assert not {"teddy bear", "hair drier"} & set(m["box"]["per_class"])
    assert sorted(m["novel_labels"]) == sorted(coco_reference_vocabulary().novel)
    assert (m["precision"], m["reference_vocabulary"], m["head_roi_size"]) == ("fp32", "coco", 4)  # tiny's own size


def test_cli_reference_lvis_vocabulary_rare_novel_and_roi_7(tmp_path):
    art = make_tiny_artifact(tmp_path / "tiny.safetensors")
    data = make_synth(tmp_path / "synth", num_images=2)
    names = {"circle": "aerosol_can", "square": "bow_(weapon)", "triangle": "tape_(sticky_cloth_or_paper)",
             "star": "Band_Aid", "ring": "CD_player", "cross": "iPod"}
    frequency = {"aerosol_can": "f", "bow_(weapon)": "r", "tape_(sticky_cloth_or_paper)": "c", "Band_Aid": "r",
                 "CD_player": "c", "iPod": "f"}
    path = renamed_coco(data, names, frequency)
    out = tmp_path / "eval"
    assert main_evaluate(["--model", str(art), "--data", str(path), "--prompt",
                          "center", "--reference-vocabulary", "lvis", "--precision", "bf16", "--out", str(out),
                          "--no-progress", "--cache-dir", str(tmp_path / "vocab-cache")]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert sorted(m["novel_labels"]) == ["Band_Aid", "bow_(weapon)"]
    assert (m["precision"], m["reference_vocabulary"], m["head_roi_size"]) == ("bf16", "lvis", 7)
    assert m["center"]["count"] == m["num_instances"] > 0
