"""The backend's training job end to end: export -> fine-tune -> evaluate both -> gate -> registry."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_finetune_support import make_synth, make_tiny_artifact  # noqa: E402

from ovsam.artifact import read_artifact_metadata  # noqa: E402
from training.gate import registry_promote  # noqa: E402
from training.pipeline import run_training_job  # noqa: E402


def test_training_job_writes_and_promotes_a_new_version(tmp_path, monkeypatch):
    base = make_tiny_artifact(tmp_path / "base.safetensors")
    data = make_synth(tmp_path / "synth", num_images=6)
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(data["root"]))  # task images are relative paths
    tasks = json.loads(data["tasks"].read_text())
    tasks.append({**tasks[0], "data": {"image": "images/missing.png"}})  # skipped, not fatal
    config = data["config"].read_text()
    model_dir = tmp_path / "models"
    options = {"epochs": 1, "max_steps": 2, "lr": 1e-3, "max_norm": 1.0, "val_fraction": 0.34,
               "tensorboard": False, "cache_dir": str(tmp_path / "vocab-cache")}
    events = []

    out = run_training_job(tasks, config, str(base), str(model_dir), 7, events.append, options=options, tolerance=1.0)
    assert out["promoted"] is True
    assert set(out) >= {"artifact", "artifact_path", "promoted", "version", "metrics", "serving_metrics"}
    assert out["version"].startswith("ovsam_tiny-test-ft-")
    registered = Path(out["artifact"])
    assert registered.parent == model_dir / "versions" and registered.exists()
    assert not (model_dir / "current").exists()  # the backend promotes after loading it
    from labelstudio_backend.registry import ModelRegistry

    ModelRegistry(model_dir).promote(registered)  # what the backend's job does next
    assert out["train_images"] + out["val_images"] == 6 and out["val_images"] > 0 and out["eval_split"] == "val"
    assert out["skipped"] == {"image not loadable": 1}
    assert out["metrics"]["box"]["count"] == out["serving_metrics"]["box"]["count"] > 0
    meta = read_artifact_metadata(registered)
    assert meta["version"] == out["version"]
    assert meta["provenance"]["gate"]["promote"] is True and meta["provenance"]["project_id"] == 7
    assert meta["provenance"]["serving_model"] == str(base)
    assert meta["metrics"]["serving"]["score"] == out["serving_metrics"]["score"]
    stages = [e["stage"] for e in events]
    assert stages[0] == "load" and "train" in stages and "gate" in stages and stages[-1] == "done"
    assert all(0.0 <= e["progress"] <= 1.0 for e in events)

    # A second job that cannot pass the gate (tolerance -1): nothing registered, the candidate kept aside.
    refused = run_training_job(tasks, config, str(base), str(model_dir), 7, None, options=options, tolerance=-1.0)
    assert refused["promoted"] is False and refused["version"] != out["version"]
    assert Path(refused["artifact"]).exists() and "jobs" in Path(refused["artifact"]).parts
    assert (model_dir / "current").read_text().strip() == registered.name
    assert sorted(p.name for p in (model_dir / "versions").iterdir()) == [registered.name]
    meta = read_artifact_metadata(refused["artifact"])
    assert meta["provenance"]["serving_model"] == str(registered)  # compared with what MODEL_DIR serves
    assert meta["provenance"]["gate"]["promote"] is False


def test_training_job_can_promote_itself(tmp_path, monkeypatch):
    base = make_tiny_artifact(tmp_path / "base.safetensors")
    data = make_synth(tmp_path / "synth", num_images=3)
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(data["root"]))
    options = {"epochs": 1, "max_steps": 1, "eval_prompts": ("box",), "tensorboard": False,
               "cache_dir": str(tmp_path / "vocab-cache")}
    out = run_training_job(json.loads(data["tasks"].read_text()), data["config"].read_text(), str(base),
                           str(tmp_path / "models"), "p1", options=options, tolerance=1.0, registrar=registry_promote)
    assert out["promoted"] and (tmp_path / "models" / "current").read_text().strip() == Path(out["artifact"]).name
    assert out["metrics"]["prompt_modes"] == ["box"]


def test_training_job_scores_both_models_against_a_larger_classifier(tmp_path, monkeypatch):
    """Job options naming a larger classifier: the candidate and the serving model are evaluated against the same
    8 labels (the project's 6 base, 2 more novel), and the candidate artifact keeps all 8."""
    import training.evaluate as evaluate
    from ovsam.artifact import load_artifact

    base = make_tiny_artifact(tmp_path / "base.safetensors")
    data = make_synth(tmp_path / "synth", num_images=3)
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(data["root"]))
    seen = []
    real = evaluate.evaluate_model

    def spy(model, vocabulary, *args, **kwargs):
        seen.append((list(vocabulary.labels), vocabulary.is_base.tolist()))
        return real(model, vocabulary, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_model", spy)
    classifier = ["hexagon", "circle", "square", "triangle", "star", "ring", "cross", "oval"]
    options = {"epochs": 1, "max_steps": 1, "eval_prompts": ("box",), "tensorboard": False, "val_fraction": 0.34,
               "cache_dir": str(tmp_path / "vocab-cache"), "classifier_labels": classifier}
    out = run_training_job(json.loads(data["tasks"].read_text()), data["config"].read_text(), str(base),
                           str(tmp_path / "models"), "p1", options=options, tolerance=1.0)
    expected = (classifier, [False, True, True, True, True, True, True, False])
    assert seen == [expected, expected]  # candidate, then serving
    vocab = load_artifact(out["candidate"]).vocabulary
    assert (vocab.labels, vocab.is_base.tolist()) == expected
