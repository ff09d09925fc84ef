"""The backend's training job end to end: export -> fine-tune -> evaluate both -> gate -> candidate (and its process)."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_finetune_support import make_synth, make_tiny_artifact  # noqa: E402

from ovsam.artifact import content_hash, read_artifact_metadata  # noqa: E402
from ovsam.artifact import root_version  # noqa: E402
from training.pipeline import run_training_job  # noqa: E402


def test_training_job_writes_a_candidate_and_the_gate_decision(tmp_path, monkeypatch):
    base = make_tiny_artifact(tmp_path / "base.safetensors")
    data = make_synth(tmp_path / "synth", num_images=6)
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(data["root"]))  # task images are relative paths
    tasks = json.loads(data["tasks"].read_text())
    tasks.append({**tasks[0], "data": {"image": "images/missing.png"}})  # skipped, not fatal
    config = data["config"].read_text()
    work = tmp_path / "job-1"
    options = {"epochs": 1, "max_steps": 2, "lr": 1e-3, "max_norm": 1.0, "val_fraction": 0.34,
               "tensorboard": False, "cache_dir": str(tmp_path / "vocab-cache")}
    events = []

    out = run_training_job(tasks, config, str(base), str(work), 7, events.append, options=options, tolerance=1.0)
    assert out["promoted"] is True
    assert set(out) >= {"candidate", "artifact", "artifact_path", "promoted", "version", "metrics", "serving_metrics"}
    assert re.fullmatch(r"ovsam_tiny-test-p7-\d{8}T\d{6}-[0-9a-f]{8}", out["version"])
    registered = Path(out["candidate"])
    assert registered.parent == work and registered.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "job-1", "synth", "vocab-cache"]
    assert out["train_images"] + out["val_images"] == 6 and out["val_images"] > 0 and out["eval_split"] == "val"
    assert out["skipped"] == {"image not loadable": 1}
    assert out["metrics"]["box"]["count"] == out["serving_metrics"]["box"]["count"] > 0
    meta = read_artifact_metadata(registered)
    checksums = {k: v for k, v in meta["checksum"].items() if k != "algorithm"}
    assert meta["version"] == out["version"] and meta["version"].endswith("-" + content_hash(checksums)[:8])
    assert meta["provenance"]["gate"]["promote"] is True and meta["provenance"]["project_id"] == 7
    assert meta["provenance"]["serving_model"] == str(base)
    assert meta["metrics"]["serving"]["score"] == out["serving_metrics"]["score"]
    stages = [e["stage"] for e in events]
    assert stages[0] == "load" and "train" in stages and "gate" in stages and stages[-1] == "done"
    assert all(0.0 <= e["progress"] <= 1.0 for e in events)

    # A second job from the first's candidate that cannot pass the gate (tolerance -1): its name keeps the root.
    refused = run_training_job(tasks, config, str(registered), str(tmp_path / "job-2"), 7, None, options=options,
                               tolerance=-1.0)
    assert refused["promoted"] is False and refused["version"] != out["version"]
    assert re.fullmatch(r"ovsam_tiny-test-p7-\d{8}T\d{6}-[0-9a-f]{8}", refused["version"])
    meta = read_artifact_metadata(refused["candidate"])
    assert meta["provenance"]["serving_model"] == str(registered)  # compared with the model it trained from
    assert meta["provenance"]["gate"]["promote"] is False


def test_root_version_strips_what_jobs_add():
    assert root_version("ovsam-demo-7") == "ovsam-demo-7"
    assert root_version("ovsam-demo-7-p12-20261129T230026-0a1b2c3d") == "ovsam-demo-7"
    assert root_version("ovsam-demo-7-ft-20261129T230026Z") == "ovsam-demo-7"


def test_job_command_runs_in_its_own_process_with_credentials_from_the_environment(tmp_path):
    """`python -m training job`: request files in, JSON progress lines on stdout, outcome.json out."""
    import subprocess

    base = make_tiny_artifact(tmp_path / "base.safetensors")
    data = make_synth(tmp_path / "synth", num_images=3)
    job = tmp_path / "job"
    job.mkdir()
    (job / "tasks.json").write_text(data["tasks"].read_text())
    (job / "label_config.xml").write_text(data["config"].read_text())
    options = {"epochs": 1, "max_steps": 1, "eval_prompts": ["box"], "tensorboard": False,
               "cache_dir": str(tmp_path / "vocab-cache"), "val_fraction": 0.34}
    (job / "request.json").write_text(json.dumps({"project": "3", "base": str(base), "tasks": "tasks.json",
                                                   "label_config": "label_config.xml", "options": options,
                                                   "tolerance": 1.0, "version_prefix": "root-p3"}))
    env = {**os.environ, "LOCAL_FILES_DOCUMENT_ROOT": str(data["root"]), "LABEL_STUDIO_API_KEY": "secret-key"}
    proc = subprocess.run([sys.executable, "-m", "training", "job", "--job-dir", str(job)], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[0]["stage"] == "load" and events[-1]["stage"] == "done"
    outcome = json.loads((job / "outcome.json").read_text())
    assert outcome["status"] == "ok" and outcome["promote"] is True
    assert re.fullmatch(r"root-p3-\d{8}T\d{6}-[0-9a-f]{8}", outcome["version"])
    assert read_artifact_metadata(outcome["candidate"])["version"] == outcome["version"]
    assert "secret-key" not in "".join(p.read_text(errors="replace") for p in job.rglob("*") if p.is_file())

    (job / "request.json").write_text(json.dumps({"project": "3", "base": str(tmp_path / "missing.safetensors"),
                                                   "tasks": "tasks.json", "label_config": "label_config.xml"}))
    failed = subprocess.run([sys.executable, "-m", "training", "job", "--job-dir", str(job)], env=env,
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=600)
    assert failed.returncode == 1
    outcome = json.loads((job / "outcome.json").read_text())
    assert outcome["status"] == "failed" and outcome["error"]


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
                           str(tmp_path / "job"), "p1", options=options, tolerance=1.0)
    expected = (classifier, [False, True, True, True, True, True, True, False])
    assert seen == [expected, expected]  # candidate, then serving
    vocab = load_artifact(out["candidate"]).vocabulary
    assert (vocab.labels, vocab.is_base.tolist()) == expected
