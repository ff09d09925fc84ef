"""DDP: two CPU processes (gloo, torchrun) train exactly like one process on the same global batch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_finetune_support import REPO, make_synth, make_tiny_artifact, subprocess_env  # noqa: E402

from training.distributed import ShardedSampler, read_csv_log  # noqa: E402
from training.finetune_cli import main_finetune  # noqa: E402


def test_sharded_sampler_splits_a_global_batch_between_ranks():
    one = ShardedSampler(10, 1, 0, seed=3)
    ranks = [ShardedSampler(10, 2, r, seed=3) for r in range(2)]
    for s in (one, *ranks):
        s.set_epoch(1)
    order = one.global_order()
    r0, r1 = ranks[0].rank_order(), ranks[1].rank_order()
    for k in range(5):  # global step k, per-rank batch 1 == 1-process batch 2
        assert {r0[k], r1[k]} == set(order[2 * k : 2 * k + 2])
    ranks[0].set_epoch(1, skip=2)
    assert list(ranks[0]) == r0[2:]


def test_two_processes_give_the_same_loss_as_one(tmp_path):
    art = make_tiny_artifact(tmp_path / "tiny.safetensors")
    data = make_synth(tmp_path / "synth", num_images=4)
    common = ["--base", str(art), "--data", str(data["tasks"]), "--label-config", str(data["config"]),
              "--epochs", "2", "--max-steps", "3", "--lr", "1e-3", "--max-norm", "1.0", "--val-fraction", "0",
              "--eval-prompts", "", "--no-progress", "--no-tensorboard", "--cache-dir", str(tmp_path / "vocab-cache")]
    # torchrun's module, from the interpreter running the tests: part of every torch install, so never skipped.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training", "finetune", *common, "--batch-size", "1", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main_finetune([*common, "--batch-size", "2", "--out", str(tmp_path / "one")]) == 0

    ddp = read_csv_log(tmp_path / "ddp" / "logs" / "train.csv")
    one = read_csv_log(tmp_path / "one" / "logs" / "train.csv")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [1, 2, 3]
    for key in ("loss", "cls", "mask", "dice", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in ddp], [r[key] for r in one], rtol=1e-4, atol=1e-6, err_msg=key)

    from ovsam.artifact import load_artifact

    a = load_artifact(tmp_path / "ddp" / "model.safetensors").model.head.state_dict()
    b = load_artifact(tmp_path / "one" / "model.safetensors").model.head.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert load_artifact(tmp_path / "ddp" / "model.safetensors").provenance["world_size"] == 2
