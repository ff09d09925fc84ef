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
            "--text-steps", "2", "--batch-size", "2", "--device", "cpu", "--no-progress"]
    assert main_demo_model(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["artifact"] == str(out) and set(record["held_out"]) == {"center", "box"}
    meta = read_artifact_metadata(out)
    assert meta["provenance"]["kind"] == "demo" and meta["provenance"]["steps"] == 3
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
