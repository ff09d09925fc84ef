"""The offline demo model: the recipe that reproduces it, and the shipped artifact itself."""
import json

import numpy as np
import pytest
import torch

from ovsam.artifact import load_artifact, read_artifact_metadata
from training.demo_model import DEFAULT_OUT, SHAPE_LABELS, main_demo_model


@pytest.mark.slow
def test_recipe_runs_end_to_end_and_resumes(tmp_path, capsys):
    out, work = tmp_path / "demo.safetensors", tmp_path / "work"
    argv = ["--out", str(out), "--work", str(work), "--images", "6", "--val-images", "2", "--steps", "3",
            "--text-steps", "2", "--batch-size", "2", "--phase2-images", "4", "--phase2-steps", "2",
            "--phase3-images", "4", "--phase3-steps", "1", "--phase4-images", "4", "--phase4-steps", "2",
            "--phase5-images", "4", "--phase5-steps", "1", "--phase6-images", "4", "--phase6-steps", "2",
            "--phase7-images", "4", "--phase7-steps", "1", "--device", "cpu", "--no-progress"]
    assert main_demo_model(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["artifact"] == str(out) and set(record["held_out"]) == {"center", "box"}
    assert set(record["held_out_random_appearance"]) == {"center", "box"}
    meta = read_artifact_metadata(out)
    provenance = meta["provenance"]
    assert provenance["kind"] == "demo" and provenance["steps"] == 1  # the artifact is phase 7's output
    assert [p["steps"] for p in provenance["phases"]] == [3, 2, 1, 2, 1, 2, 1] and provenance["data"]["phase6_images"] == 4
    assert [p.get("appearance") for p in provenance["phases"]] == [None, "random"] + ["class"] * 5
    for n, images in ((2, 4), (3, 4), (4, 4), (5, 4), (6, 4)):  # each phase drew its own count of images
        assert len(json.loads((work / f"train{n}" / "tasks.json").read_text())) == images, n
    # Phases 1-5 train everything; phase 6 keeps trunk and neck frozen and gives the decoder the fine maps;
    # phase 7 trains the same split on phase 6's images at a 320 input.
    assert [p["hyperparameters"]["train_all"] for p in provenance["phases"]] == [True] * 5 + [False] * 2
    assert provenance["phases"][5]["hyperparameters"]["decoder_high_res"] is True
    assert meta["config"]["decoder_high_res"] is True
    assert provenance["phases"][6]["hyperparameters"]["image_size"] == 320 and meta["config"]["image_size"] == 320
    assert provenance["data"]["phase7_seed"] == provenance["data"]["phase6_seed"] == 6
    assert provenance["phases"][6]["data"] == provenance["phases"][5]["data"]  # drawn once, read by both
    assert not (work / "train7").exists()
    assert provenance["phases"][1]["hyperparameters"]["num_proposals"] == 16
    assert provenance["phases"][3]["hyperparameters"]["lr"] == 3e-4 and provenance["data"]["phase4_seed"] == 4
    assert all(p["hyperparameters"]["head_mask_pooling"] for p in provenance["phases"])
    assert meta["config"]["head_mask_pooling"] is True
    assert meta["version"] == "ovsam-demo-7" and set(meta["metrics"]) >= {"held_out", "held_out_random_appearance"}
    assert provenance["data"]["train_appearance"] == "random" and provenance["data"]["held_out_appearance"] == "class"
    assert sorted(meta["vocabulary"]["labels"]) == sorted(SHAPE_LABELS)
    loaded = load_artifact(out)
    assert next(loaded.model.parameters()).dtype == torch.float32  # float16 on disk, float32 in memory
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        float_dtypes = {f.get_tensor(k).dtype for k in f.keys() if k.startswith(("model.", "text."))} - {torch.int64}
    assert float_dtypes == {torch.float16}, float_dtypes
    # A second run with the same --work finds the finished checkpoint and does not train again.
    assert main_demo_model(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["version"] == record["version"]


def test_shipped_demo_model_is_small_documented_and_float16():
    assert DEFAULT_OUT.is_file(), "labelstudio_backend/default_model/ovsam_demo.safetensors is part of the repository"
    assert DEFAULT_OUT.stat().st_size <= 20 * 2**20
    meta = read_artifact_metadata(DEFAULT_OUT)
    provenance = meta["provenance"]
    assert provenance["kind"] == "demo" and "demo-model" in provenance["recipe"]
    assert provenance["text_spread"]["mean_abs_cosine_after"] < 0.3
    assert sorted(meta["vocabulary"]["labels"]) == sorted(SHAPE_LABELS)
    assert meta["config"]["use_clip_branch"] is False and meta["config"]["head_mask_pooling"] is True


@pytest.mark.slow
def test_shipped_demo_model_segments_and_names_unseen_synthetic_shapes(tmp_path):
    """Fresh images (a seed the recipe never used): a click at an object's centre gives its mask and class."""
    from training.data.labelstudio_export import load_labelstudio_export_file
    from training.evaluate import evaluate_model
    from training.synth import SynthConfig, write_dataset
    from training.dataset import make_image_source

    write_dataset(SynthConfig(out=tmp_path, num_images=12, seed=4242), progress=False)
    samples, _ = load_labelstudio_export_file(tmp_path / "tasks.json")
    loaded = load_artifact(DEFAULT_OUT)
    images = make_image_source(tmp_path)
    metrics = evaluate_model(loaded.model, loaded.vocabulary, samples, images, device="cpu").metrics
    assert metrics["num_instances"] > 30
    assert metrics["center"]["miou"] >= MIN_CLICK_MIOU and metrics["center"]["accuracy"] >= MIN_CLICK_ACCURACY, metrics
    assert metrics["box"]["miou"] >= MIN_BOX_MIOU, metrics


# Floors under what the shipped model (ovsam-demo-7) measures on these 12 images (51 objects, class appearance):
# click mIoU 0.880, accuracy 0.980 (chance: 0.17), box mIoU 0.893 (ovsam-demo-6: 0.871, 0.902, 0.890). Its figures on
# 60 held-out images are in the artifact's metrics.
MIN_CLICK_MIOU, MIN_CLICK_ACCURACY, MIN_BOX_MIOU = 0.82, 0.88, 0.84
