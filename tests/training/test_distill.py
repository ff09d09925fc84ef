"""SAM2CLIP: dumping teacher embeddings and distilling them into the neck (tiny SAM encoder, tiny OVSAM)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_finetune_support import make_synth, make_tiny_artifact  # noqa: E402

from training import dump_features  # noqa: E402
from training.distill import DistillConfig, distill, main_distill  # noqa: E402


def tiny_sam_encoder() -> ImageEncoderViT:
    """SAM's encoder class at toy size: 128 px in, [32, 8, 8] out (the tiny OVSAM's embedding shape)."""
    torch.manual_seed(1)
    return ImageEncoderViT(img_size=128, patch_size=16, embed_dim=32, depth=1, num_heads=2, out_chans=32)


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    data = make_synth(root / "synth", num_images=4)
    mp = pytest.MonkeyPatch()
    mp.setattr(dump_features, "build_sam_encoder", lambda model_type, checkpoint: tiny_sam_encoder())
    args = ["--sam-checkpoint", "unused.pth", "--images", str(root / "synth" / "images"), "--out", str(root / "feats"),
            "--no-progress", "--device", "cpu"]
    assert dump_features.main_dump_sam_features(args) == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in (root / "feats").iterdir()}
    assert dump_features.main_dump_sam_features(args) == 0  # second run skips every image
    assert {p.name: p.stat().st_mtime_ns for p in (root / "feats").iterdir()} == mtimes
    mp.undo()
    return {"root": root, "images": root / "synth" / "images", "feats": root / "feats",
            "artifact": make_tiny_artifact(root / "tiny.safetensors")}


def test_dump_writes_one_fp16_embedding_per_image_stem(dumped):
    files = sorted(p.name for p in dumped["feats"].iterdir())
    assert files == [f"img_{i:04d}.pt" for i in range(4)]
    feat = torch.load(dumped["feats"] / files[0], weights_only=True)
    assert feat.dtype == torch.float16 and feat.shape == (32, 8, 8)
    x = dump_features.sam_input(dump_features.read_rgb(dumped["images"] / "img_0000.png"), 128)
    with torch.no_grad():
        expected = tiny_sam_encoder()(x)[0].half()
    assert torch.allclose(feat.float(), expected.float(), atol=1e-2)


def test_duplicate_stems_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="stem"):
        dump_features.list_images([tmp_path / "a", tmp_path / "b"])


def _cfg(dumped, out: Path, **kw) -> DistillConfig:
    return DistillConfig(images=[str(dumped["images"])], features=str(dumped["feats"]), out=str(out),
                         base=str(dumped["artifact"]), epochs=3, batch_size=2, lr=1e-3, warmup_steps=1,
                         progress=False, tensorboard=False, **kw)


def test_distill_trains_only_the_neck_and_loss_falls(dumped, tmp_path):
    from ovsam.artifact import load_artifact

    out = tmp_path / "student.safetensors"
    code = main_distill(["--images", str(dumped["images"]), "--features", str(dumped["feats"]), "--base",
                         str(dumped["artifact"]), "--out", str(out), "--epochs", "10", "--lr", "2e-3",
                         "--warmup-steps", "1", "--no-progress", "--no-tensorboard"])
    assert code == 0
    art = load_artifact(out)
    m = art.metrics["distill"]
    assert m["train_mse_last"] < 0.8 * m["train_mse_first"], m
    base = load_artifact(dumped["artifact"]).model.state_dict()
    new = art.model.state_dict()
    changed = {k for k in new if not torch.equal(new[k], base[k])}
    assert changed and all(k.startswith("neck.") for k in changed)
    assert "neck.pos_embed" not in changed
    assert art.provenance["kind"] == "sam2clip-distill" and art.provenance["num_images"] == 4
    assert "-distill-" in art.version


def test_distill_resume_matches_an_uninterrupted_run(dumped, tmp_path):
    from ovsam.artifact import load_artifact

    class Crash(Exception):
        pass

    def crash(event):
        if event["event"] == "epoch_end" and event["epoch"] == 2:
            raise Crash()

    distill(_cfg(dumped, tmp_path / "full.safetensors"))
    with pytest.raises(Crash):
        distill(_cfg(dumped, tmp_path / "cut.safetensors"), on_progress=crash)
    distill(_cfg(dumped, tmp_path / "cut.safetensors", resume=True))
    a = load_artifact(tmp_path / "full.safetensors").model.neck.state_dict()
    b = load_artifact(tmp_path / "cut.safetensors").model.neck.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_distill_from_a_configuration_writes_a_complete_artifact(dumped, tmp_path):
    from ovsam.artifact import load_artifact

    out = tmp_path / "fresh.safetensors"
    summary = distill(DistillConfig(images=[str(dumped["images"])], features=str(dumped["feats"]), out=str(out),
                                    config="tiny", labels=("shape", "background"), max_steps=2, val_fraction=0.25,
                                    progress=False, tensorboard=False))
    art = load_artifact(out)
    assert art.vocabulary.labels == ["shape", "background"] and art.text_encoder is not None
    assert summary["steps"] == 2 and summary["val_mse"] > 0 and art.provenance["num_images"] == 3
