"""Fine-tuning: losses, examples, schedule, learning on synthetic data, and exact resume."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_finetune_support import LABELS, make_synth, make_tiny_artifact, renamed_coco  # noqa: E402

from training import losses as L  # noqa: E402
from training.finetune import finetune  # noqa: E402
from training.finetune_cli import main_finetune  # noqa: E402
from training.finetune_config import FinetuneConfig  # noqa: E402
from training.provenance import make_version  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    return {"artifact": make_tiny_artifact(root / "tiny.safetensors"), "data": make_synth(root / "synth", num_images=4),
            "root": root}


# ------------------------------------------------------------------------------------------ losses


def test_sample_binary_masks_equals_grid_sample_on_padded_masks():
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 20, 24, generator=g) > 0.5).to(torch.uint8)
    index = torch.tensor([0, 2, 1, 2, 0])
    coords = torch.rand(5, 64, 2, generator=g)
    padded = F.pad(masks.float(), (0, 32 - 24, 0, 32 - 20))
    expected = L.point_sample(padded[index].unsqueeze(1), coords)[:, 0]
    assert torch.allclose(L.sample_binary_masks(masks, index, coords, 32), expected, atol=1e-6)


def test_uncertain_points_pick_the_boundary_and_are_seeded_per_image():
    logits = torch.full((2, 1, 16, 16), -10.0)
    logits[:, :, :, 8:] = 10.0  # boundary at x = 0.5
    a = L.uncertain_point_coords(logits, [1, 1], [7, 8], num_points=400)
    b = L.uncertain_point_coords(logits[1:], [1], [8], num_points=400)
    assert a.shape == (2, 400, 2)
    assert torch.equal(a[1], b[0])  # a prompt's points do not depend on its batch
    chosen = a[:, :150]  # the 75% most uncertain: at the boundary or at the border (zero padding)
    near = ((chosen[..., 0] - 0.5).abs() < 1 / 16) | (chosen < 1 / 32).any(-1) | (chosen > 1 - 1 / 32).any(-1)
    assert near.float().mean() > 0.9


def test_losses_reduce_like_the_reference():
    logits = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ce = L.classification_loss(logits, torch.tensor([0, 1]), 0.1, normaliser=2.0)
    assert ce.item() == pytest.approx((0.0 + np.log(3)) / 2, abs=1e-4)
    pred = torch.tensor([[10.0, -10.0], [0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    out = L.mask_losses(pred, target, normaliser=2.0)
    dice_2 = 1 - (2 * 1.0 + 1) / (1.0 + 2.0 + 1)  # p = 0.5 on both points of mask 2
    assert out["dice"].item() == pytest.approx((0.0 + dice_2) / 2, abs=1e-3)
    assert L.default_num_points(1024) == 12544 and L.default_num_points(128) == 196


def test_schedule_and_weight_decay_groups(world):
    from ovsam.artifact import load_artifact
    from training.optim import NO_DECAY_RULES, param_groups, warmup_multistep

    f = warmup_multistep(120, 10, (8 / 12, 11 / 12), 0.1)
    assert f(0) == pytest.approx(0.001) and f(10) == 1.0 and f(79) == 1.0
    assert f(80) == pytest.approx(0.1) and f(110) == pytest.approx(0.01)
    model = load_artifact(world["artifact"]).model
    names = {id(p): n for n, p in model.named_parameters()}
    # Ours ("extended"): norms, biases, tokens and 1-D parameters are spared.
    decay, plain = param_groups(model, 0.05, NO_DECAY_RULES["extended"])
    plain_names = {names[id(p)] for p in plain["params"]}
    assert "head.label_token.weight" in plain_names and "head.mask_decoder.mask_tokens.weight" in plain_names
    assert all(n.endswith("bias") or "norm" in n or "token" in n or "output_upscaling.1" in n for n in plain_names)
    trained = {names[id(p)] for g in (decay, plain) for p in g["params"]}
    assert trained and all(n.startswith("head.") and not n.startswith("head.label_mlp") for n in trained)
    # The reference's (the default): only nn.LayerNorm & co. are spared; SAM's LayerNorm2d, biases, tokens decay.
    decay, plain = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    ref_plain = {names[id(p)] for p in plain["params"]}
    ref_decay = {names[id(p)] for p in decay["params"]}
    assert ref_plain | ref_decay == trained
    assert ref_plain == {n for n in trained if ".norm" in n and n.startswith("head.mask_decoder.transformer.")}
    assert {"head.label_token.weight", "head.mask_decoder.mask_tokens.weight", "head.mask_decoder.output_upscaling.1.weight",
            "head.fpn.inner_blocks.0.0.bias"} <= ref_decay
    assert FinetuneConfig(base="b", out="o").weight_decay_groups == "reference"


def test_examples_have_sampled_prompts_and_box_only_instances(world):
    from ovsam import get_config
    from training.data.types import Instance, Sample
    from training.dataset import CLIP2SAMDataset, ExampleConfig, collate_examples, load_training_data, make_image_source

    data = load_training_data(world["data"]["tasks"])
    s = data.samples[0]
    box_only = Instance(s.instances[0].label, None, np.array([2, 2, 40, 30], np.float32), "rectangle")
    s2 = Sample(s.task_id, s.image_ref, [*s.instances, box_only], s.width, s.height)
    ds = CLIP2SAMDataset([s2], {l: i for i, l in enumerate(LABELS)}, make_image_source(data.image_root),
                         ExampleConfig(128, augment=True, seed=3), get_config("tiny"))
    a, b = ds[0], ds[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["points"], b["points"])  # seeded by (seed, epoch, index)
    ds.set_epoch(1)
    assert not torch.equal(a["points"], ds[0]["points"])
    batch = collate_examples([a, a])
    assert batch["images"].shape == (2, 3, 128, 128) and batch["labels"].shape == (80,)
    per_image = batch["is_box"].view(2, 40)
    assert (per_image.sum(1) >= 21).all()  # 21 box prompts (more if box-only instances need them) ...
    assert all(torch.equal(row, row.sort(descending=True).values) for row in per_image)  # ... boxes first
    box_only_rows = ~batch["has_mask"]
    if box_only_rows.any():  # the box-only instance survived the crop: always a box prompt
        assert batch["is_box"][box_only_rows].all()


def test_version_string():
    from datetime import datetime, timezone

    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert make_version("ovsam_tiny", when) == "ovsam_tiny-ft-20250102T030405Z"
    assert make_version("ovsam_tiny-ft-20240101T000000Z", when) == "ovsam_tiny-ft-20250102T030405Z"
    assert make_version("ovsam_tiny-ft-20240101T000000Z-2", when) == "ovsam_tiny-ft-20250102T030405Z"


# ----------------------------------------------------------------------------------------- learning


def test_finetune_learns_on_synthetic_images(world, tmp_path):
    """A random tiny model fine-tuned on two synthetic images: loss falls, IoU and accuracy rise."""
    from ovsam.artifact import load_artifact
    from training.dataset import load_training_data

    data = load_training_data(world["data"]["tasks"], world["data"]["config"].read_text())
    data.samples = data.samples[:2]
    cfg = FinetuneConfig(base=str(world["artifact"]), out=str(tmp_path / "run"), epochs=1000, max_steps=100,
                         lr=2e-3, max_norm=None, warmup_steps=5, milestones=(), augment=False, cache_features=True,
                         val_fraction=0.0, eval_before=True, progress=False, tensorboard=False,
                         cache_dir=str(world["root"] / "vocab-cache"))
    result = finetune(cfg, data=data)
    before, after = result.metrics["before"], result.metrics["val"]
    losses = [h["loss"] for h in result.history]
    print("loss", losses[0], "->", np.mean(losses[-5:]),
          {m: (before[m]["miou"], after[m]["miou"], before[m]["accuracy"], after[m]["accuracy"]) for m in ("box", "center")})
    assert np.mean(losses[-5:]) < 0.3 * losses[0]
    assert after["box"]["miou"] > before["box"]["miou"] + 0.1
    assert after["center"]["miou"] > before["center"]["miou"] + 0.05
    assert after["box"]["accuracy"] > before["box"]["accuracy"] + 0.2
    assert result.metrics["eval_split"] == "train"

    art = load_artifact(result.artifact)
    assert art.version == result.version and re.fullmatch(r"ovsam_tiny-test-ft-\d{8}T\d{6}Z", art.version)
    prov = art.provenance
    assert prov["base_version"] == "ovsam_tiny-test" and prov["data_hash"].startswith("sha256:")
    assert prov["seed"] == 0 and prov["steps"] == 100 and "command" in prov and "git_commit" in prov
    assert art.metrics["val"]["box"]["miou"] == pytest.approx(after["box"]["miou"])
    assert art.vocabulary.labels == list(LABELS)
    base = load_artifact(world["artifact"])
    key = "neck.blocks.0.attn.qkv.weight"
    assert torch.equal(art.model.state_dict()[key], base.model.state_dict()[key])  # frozen parts untouched
    assert not torch.equal(art.model.head.roi_conv.weight, base.model.head.roi_conv.weight)


# ------------------------------------------------------------------------------------------- resume


class Crash(Exception):
    pass


def _cfg(world, out: Path, **kw) -> FinetuneConfig:
    settings = dict(epochs=2, batch_size=1, lr=1e-3, max_norm=1.0, val_fraction=0.0, eval_prompts=(), progress=False,
                    tensorboard=False, cache_dir=str(world["root"] / "vocab-cache"))
    settings["base"] = str(world["artifact"])
    settings.update(data=str(world["data"]["tasks"]), label_config=str(world["data"]["config"]))
    return FinetuneConfig(out=str(out), **{**settings, **kw})


def _head(path: Path) -> dict:
    from ovsam.artifact import load_artifact

    return load_artifact(path).model.head.state_dict()


def _cli_argv(world, out: Path, *extra: str) -> list:
    """`python -m training finetune` arguments for the tiny world (batch 1, no validation), plus `extra`."""
    return ["--base", str(world["artifact"]), "--data", str(world["data"]["tasks"]), "--label-config",
            str(world["data"]["config"]), "--out", str(out), "--batch-size", "1", "--lr", "1e-3", "--max-norm", "1.0",
            "--val-fraction", "0", "--eval-prompts", "", "--no-progress", "--cache-dir", str(world["root"] / "vocab-cache"),
            *extra]


def test_resume_after_a_crash_reaches_the_same_weights(world, tmp_path):
    # Uninterrupted, through the CLI (LSJ on, 4 images, batch 1: 4 steps per epoch, 8 steps).
    argv = _cli_argv(world, tmp_path / "full", "--epochs", "2")
    assert main_finetune(argv) == 0
    full = _head(tmp_path / "full" / "model.safetensors")
    log = (tmp_path / "full" / "logs" / "train.csv").read_text().splitlines()
    assert log[0].startswith("step,epoch,lr") and len(log) == 9
    assert any((tmp_path / "full" / "tb").iterdir())

    def crash_at(event_name: str, when: int):
        def cb(event):
            if event["event"] == event_name and event.get("epoch" if event_name == "epoch_end" else "step") == when:
                raise Crash()
        return cb

    # Killed right after the end of epoch 1.
    with pytest.raises(Crash):
        finetune(_cfg(world, tmp_path / "a"), on_progress=crash_at("epoch_end", 1))
    finetune(_cfg(world, tmp_path / "a", resume=True))
    resumed = _head(tmp_path / "a" / "model.safetensors")
    # Killed mid-epoch 2 (step 6), with a checkpoint every step: resumes from step 5.
    with pytest.raises(Crash):
        finetune(_cfg(world, tmp_path / "b", checkpoint_interval=1), on_progress=crash_at("step", 6))
    finetune(_cfg(world, tmp_path / "b", checkpoint_interval=1, resume=True))
    resumed_mid = _head(tmp_path / "b" / "model.safetensors")
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
        assert torch.equal(full[k], resumed_mid[k]), k
    steps = [int(r.split(",")[0]) for r in (tmp_path / "b" / "logs" / "train.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 9))


def test_unknown_evaluation_prompt_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown evaluation prompt mode"):
        FinetuneConfig(base="b", data="d", out=str(tmp_path), eval_prompts=("center", "point"))


def test_cached_features_need_no_augmentation(world, tmp_path):
    with pytest.raises(ValueError, match="no-augment"):
        _cfg(world, tmp_path, cache_features=True)


def test_gradient_accumulation_equals_the_bigger_batch(world, tmp_path):
    from training.distributed import read_csv_log

    finetune(_cfg(world, tmp_path / "acc", batch_size=1, grad_accum=2, max_steps=3))
    finetune(_cfg(world, tmp_path / "big", batch_size=2, grad_accum=1, max_steps=3))
    acc = read_csv_log(tmp_path / "acc" / "logs" / "train.csv")
    big = read_csv_log(tmp_path / "big" / "logs" / "train.csv")
    assert len(acc) == len(big) == 3
    np.testing.assert_allclose([r["loss"] for r in acc], [r["loss"] for r in big], rtol=1e-4)
    a, b = _head(tmp_path / "acc" / "model.safetensors"), _head(tmp_path / "big" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_cached_features_train_exactly_like_recomputed_ones(world, tmp_path):
    from training.distributed import read_csv_log

    finetune(_cfg(world, tmp_path / "cached", augment=False, cache_features=True, max_steps=5))
    finetune(_cfg(world, tmp_path / "plain", augment=False, max_steps=5))
    cached = read_csv_log(tmp_path / "cached" / "logs" / "train.csv")
    plain = read_csv_log(tmp_path / "plain" / "logs" / "train.csv")
    np.testing.assert_allclose([r["loss"] for r in cached], [r["loss"] for r in plain], rtol=1e-5)


def test_frozen_mask_decoder_keeps_masks_and_trains_recognition(world, tmp_path):
    finetune(_cfg(world, tmp_path / "run", augment=False, cache_features=True, max_steps=4, train_mask_decoder=False))
    before, after = _head(world["artifact"]), _head(tmp_path / "run" / "model.safetensors")
    decoder = [k for k in before if k.startswith("mask_decoder.")]
    assert decoder and all(torch.equal(before[k], after[k]) for k in decoder)
    assert any(not torch.equal(before[k], after[k]) for k in before if not k.startswith("mask_decoder."))


def test_frozen_fpn_trains_only_the_roi_projection(world, tmp_path):
    finetune(_cfg(world, tmp_path / "run", augment=False, cache_features=True, max_steps=4, train_mask_decoder=False,
                  train_fpn=False))
    before, after = _head(world["artifact"]), _head(tmp_path / "run" / "model.safetensors")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["roi_conv.weight"], changed


def test_cli_freeze_fpn(world, tmp_path):
    argv = _cli_argv(world, tmp_path / "cli", "--max-steps", "2", "--no-augment", "--freeze-mask-decoder", "--freeze-fpn")
    assert main_finetune(argv) == 0
    before, after = _head(world["artifact"]), _head(tmp_path / "cli" / "model.safetensors")
    assert sorted(k for k in before if not torch.equal(before[k], after[k])) == ["roi_conv.weight"]


def test_cli_roi_pooling_switches_the_new_model_and_default_keeps_the_base(world, tmp_path):
    from ovsam.artifact import read_artifact_metadata

    assert main_finetune(_cli_argv(world, tmp_path / "mask", "--max-steps", "1", "--no-augment", "--roi-pooling", "mask")) == 0
    assert read_artifact_metadata(tmp_path / "mask" / "model.safetensors")["config"]["head_mask_pooling"] is True
    assert main_finetune(_cli_argv(world, tmp_path / "keep", "--max-steps", "1", "--no-augment")) == 0
    assert read_artifact_metadata(tmp_path / "keep" / "model.safetensors")["config"]["head_mask_pooling"] is False


def test_cli_decoder_high_res_adds_and_trains_the_projections(world, tmp_path):
    """`--decoder-high-res` gives the base's decoder the trunk's fine maps: the new artifact records it, its
    zero-initialised projections have learned, and a later fine-tune of that model keeps them."""
    from ovsam.artifact import read_artifact_metadata

    argv = _cli_argv(world, tmp_path / "hr", "--max-steps", "3", "--no-augment", "--cache-features", "--decoder-high-res")
    assert main_finetune(argv) == 0
    out = tmp_path / "hr" / "model.safetensors"
    assert read_artifact_metadata(out)["config"]["decoder_high_res"] is True
    head = _head(out)
    assert all(head[f"mask_decoder.high_res_proj.{i}.weight"].abs().sum() > 0 for i in (0, 1))
    assert "mask_decoder.high_res_proj.0.weight" not in _head(world["artifact"])
    again = [a if a != str(world["artifact"]) else str(out) for a in _cli_argv(world, tmp_path / "again", "--max-steps", "1",
                                                                              "--no-augment", "--freeze-mask-decoder")]
    assert main_finetune(again) == 0
    kept = _head(tmp_path / "again" / "model.safetensors")
    assert torch.equal(kept["mask_decoder.high_res_proj.1.weight"], head["mask_decoder.high_res_proj.1.weight"])
    with pytest.raises(ValueError, match="decoder-high-res"):
        _cfg(world, tmp_path, decoder_high_res=True, train_mask_decoder=False)


def test_train_all_trains_trunk_and_neck_and_resumes_exactly(world, tmp_path):
    """Pretraining from scratch (the demo model's path): every module but the prompt encoder learns."""
    from ovsam.artifact import load_artifact

    finetune(_cfg(world, tmp_path / "full", train_all=True))
    base = load_artifact(world["artifact"]).model.state_dict()
    full = load_artifact(tmp_path / "full" / "model.safetensors").model.state_dict()
    assert not torch.equal(base["trunk.visual.conv1.weight"], full["trunk.visual.conv1.weight"])
    assert not torch.equal(base["neck.blocks.0.attn.qkv.weight"], full["neck.blocks.0.attn.qkv.weight"])
    assert torch.equal(base["neck.pos_embed"], full["neck.pos_embed"])  # a buffer: SAM's, never trained
    assert torch.equal(base["prompt_encoder.point_embeddings.0.weight"], full["prompt_encoder.point_embeddings.0.weight"])

    def crash_after_epoch_1(event):
        if event["event"] == "epoch_end" and event.get("epoch") == 1:
            raise Crash()

    with pytest.raises(Crash):
        finetune(_cfg(world, tmp_path / "a", train_all=True), on_progress=crash_after_epoch_1)
    finetune(_cfg(world, tmp_path / "a", train_all=True, resume=True))
    resumed = load_artifact(tmp_path / "a" / "model.safetensors").model.state_dict()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    with pytest.raises(ValueError, match="train-all"):
        _cfg(world, tmp_path, train_all=True, cache_features=True, augment=False)


# ------------------------------------------------------------------------------------ mask pooling


def test_mask_pooling_classifies_gt_masks_in_training(world, tmp_path):
    """With `head_mask_pooling` the training step pools each RoI over its GT mask; a box-only instance
    (no mask) falls back to the box average, and fine-tuning keeps the switch in the new artifact."""
    from ovsam.artifact import load_artifact
    from ovsam.roi import boxes_to_rois, mask_occupancy
    from training.data.types import Instance, Sample
    from training.dataset import CLIP2SAMDataset, ExampleConfig, collate_examples, load_training_data, make_image_source
    from training.train_step import CLIP2SAMTrainStep

    base = make_tiny_artifact(tmp_path / "masked.safetensors", head_mask_pooling=True)
    art = load_artifact(base)
    assert art.model.cfg.head_mask_pooling
    data = load_training_data(world["data"]["tasks"])
    s = data.samples[0]
    box_only = Instance(s.instances[0].label, None, np.array([2, 2, 60, 50], np.float32), "rectangle")
    s2 = Sample(s.task_id, s.image_ref, [*s.instances, box_only], s.width, s.height)
    ds = CLIP2SAMDataset([s2], {l: i for i, l in enumerate(LABELS)}, make_image_source(data.image_root),
                         ExampleConfig(128, augment=False, seed=3), art.model.cfg)
    batch = collate_examples([ds[0]])
    assert (~batch["has_mask"]).any()
    step = CLIP2SAMTrainStep(art.model.eval(), art.vocabulary.embeddings)
    with torch.no_grad():
        logits = step(batch)["logits"]
        pyramid = art.model.head.pyramid(art.model.trunk(batch["images"]))
        rois = boxes_to_rois(batch["boxes"], batch["image_index"])
        weights = mask_occupancy(batch["masks"], rois, art.model.head.roi_size, 1.0, batch["mask_index"])
        masked = art.model.head.classify(pyramid, rois, step.text_embeddings, weights)
        boxed = art.model.head.classify(pyramid, rois, step.text_embeddings)
    torch.testing.assert_close(logits, masked)
    has = batch["has_mask"]
    torch.testing.assert_close(logits[~has], boxed[~has])
    assert not torch.allclose(logits[has], boxed[has])  # real masks change what is pooled

    result = finetune(_cfg(world, tmp_path / "run", base=str(base), augment=False, cache_features=True, max_steps=3))
    assert load_artifact(result.artifact).model.cfg.head_mask_pooling


def test_the_label_fit_sees_each_object_as_the_served_model_does(tmp_path):
    """Besides the annotated outline, the fit embeds what a click at each object's centre and its box make the served
    model outline, exactly as the predictor does for those prompts; outlines far from the annotation are left out.
    The shipped demo model: a random tiny model outlines the same blob whatever the prompt."""
    from ovsam.artifact import load_artifact
    from ovsam.predictor import OVSAMPredictor, Prompt
    from training.dataset import CLIP2SAMDataset, ExampleConfig, collate_examples, load_training_data, make_image_source
    from training.demo_model import DEFAULT_OUT
    from training.evaluate import center_prompt
    from training.train_step import CLIP2SAMTrainStep
    from training.label_fit import unique_instances

    art = load_artifact(DEFAULT_OUT)
    model = art.model.eval()
    data = load_training_data(make_synth(tmp_path / "synth", num_images=1, size=256, seed=5)["tasks"])
    images = make_image_source(data.image_root)
    sample = data.samples[0]
    labels = list(art.vocabulary.labels)
    ds = CLIP2SAMDataset([sample], {l: i for i, l in enumerate(labels)}, images,
                         ExampleConfig(model.cfg.image_size, augment=False, seed=3), model.cfg)
    batch = collate_examples([ds[0]])
    keep = unique_instances(batch["mask_index"])
    step = CLIP2SAMTrainStep(model, art.vocabulary.embeddings)
    with torch.no_grad():
        feats = model.trunk(batch["images"])
        inputs = (batch, model.head.pyramid(feats), model.neck(feats), model.head.high_res_features(feats), keep)
        every, every_labels = step.served_embeddings(*inputs, min_iou=0.0)
        kept, _ = step.served_embeddings(*inputs)
        none, _ = step.served_embeddings(*inputs, min_iou=1.01)
    n = len(keep)
    assert every.shape == (2 * n, model.cfg.clip_embed_dim) and none.shape[0] == 0 and n <= len(kept) <= 2 * n
    assert torch.equal(every_labels, batch["labels"][keep].repeat(2))  # clicks first, then boxes

    seen = []
    original = model.head.roi_embeddings
    model.head.roi_embeddings = lambda *a, **k: seen.append(original(*a, **k)) or seen[-1]
    predictor = OVSAMPredictor(model, art.vocabulary, cache_bytes=0)
    served = predictor.set_image(images.load(sample.image_ref))
    scale = np.array(served.frame.scale_xy * 2, np.float32)
    assert all(i.mask is not None and i.label in labels for i in sample.instances)  # instance k is example mask k
    for j, position in enumerate(keep):
        inst = sample.instances[int(batch["mask_index"][position])]
        click = Prompt(points=center_prompt(inst.mask, served.frame), point_labels=np.ones(1, np.int64))
        box = Prompt(box=batch["boxes"][position].numpy() / scale)
        for prompt, row in ((click, j), (box, n + j)):
            seen.clear()
            predictor.predict_batch([prompt], features=served)
            torch.testing.assert_close(every[row], seen[-1][0], atol=1e-4, rtol=1e-4)


def test_cli_fit_label_embeddings_alone_moves_only_the_label_rows(world, tmp_path):
    """`--fit-label-embeddings --max-steps 0`: the head stays the base's, the artifact's rows are fitted to the
    annotated objects (they name them at least as well as the text rows did), and they are what is served."""
    from ovsam.artifact import load_artifact
    from ovsam.vocabulary import artifact_vocabulary

    argv = _cli_argv(world, tmp_path / "fit", "--max-steps", "0", "--no-augment", "--cache-features",
                     "--fit-label-embeddings")
    assert main_finetune(argv) == 0
    out = tmp_path / "fit" / "model.safetensors"
    before, after = _head(world["artifact"]), _head(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    art, base = load_artifact(out), load_artifact(world["artifact"])
    labels = art.vocabulary.labels
    assert not torch.allclose(art.vocabulary.embeddings.float(), artifact_vocabulary(base, labels).embeddings.float())
    fit = art.provenance["label_fit"]
    assert sum(fit["objects"].values()) > 0 and fit["train_accuracy_after"] >= fit["train_accuracy_before"]
    assert art.provenance["steps"] == 0
    assert torch.equal(artifact_vocabulary(art, labels).embeddings, art.vocabulary.embeddings)  # served as fitted
    with pytest.raises(ValueError, match="max-steps 0"):
        _cfg(world, tmp_path, max_steps=0)


def test_fitted_rows_train_the_head_and_survive_a_resume(world, tmp_path):
    """With steps after the fit, the head trains against the fitted rows; a run killed mid-way resumes with
    the same rows (not refitted to a changed head) and ends where the uninterrupted run ends."""
    from ovsam.artifact import load_artifact

    kw = dict(augment=False, cache_features=True, fit_label_embeddings=True, train_mask_decoder=False, epochs=2,
              checkpoint_interval=1)
    full = finetune(_cfg(world, tmp_path / "full", **kw))
    with pytest.raises(Crash):
        finetune(_cfg(world, tmp_path / "cut", **kw),
                 on_progress=lambda e: (_ for _ in ()).throw(Crash()) if e["event"] == "step" and e["step"] == 3 else None)
    finetune(_cfg(world, tmp_path / "cut", resume=True, **kw))
    a, b = load_artifact(tmp_path / "full" / "model.safetensors"), load_artifact(tmp_path / "cut" / "model.safetensors")
    assert torch.equal(a.vocabulary.embeddings, b.vocabulary.embeddings)
    assert torch.equal(a.vocabulary.embeddings, full.vocabulary.embeddings)
    for k, v in a.model.head.state_dict().items():
        assert torch.equal(v, b.model.head.state_dict()[k]), k
    assert not torch.equal(a.model.head.roi_conv.weight, load_artifact(world["artifact"]).model.head.roi_conv.weight)


def test_cli_image_size_moves_the_new_model_to_that_side(world, tmp_path):
    """`--image-size` trains and writes the model at another input side; the artifact loads and predicts there."""
    from ovsam.artifact import load_artifact, read_artifact_metadata

    base_side = read_artifact_metadata(world["artifact"])["config"]["image_size"]
    argv = _cli_argv(world, tmp_path / "big", "--max-steps", "2", "--no-augment", "--cache-features",
                     "--image-size", str(base_side + 32))
    assert main_finetune(argv) == 0
    out = load_artifact(tmp_path / "big" / "model.safetensors")
    assert out.model.cfg.image_size == base_side + 32
    with torch.no_grad():
        feats = out.model.encode_image(np.zeros((40, 50, 3), np.uint8))
    assert feats.embedding.shape[-1] == (base_side + 32) // 16
    with pytest.raises(ValueError, match="multiple of 32"):
        _cfg(world, tmp_path, image_size=base_side + 8)


# ----------------------------------------------------------------------------- a larger classifier


def test_training_labels_against_a_larger_classifier(world, tmp_path):
    """Annotations of {circle, square} against the classifier [triangle, circle, star, square]: the head's logits
    have 4 (+ background) columns, targets are the classifier's indices of their names, the artifact keeps the 4
    labels (the annotated two base, the others novel); the label fit moves only the annotated rows."""
    from ovsam.artifact import load_artifact
    from training.dataset import collate_examples
    from training.finetune import start_run
    from training.train_step import to_device
    from ovsam.vocabulary import artifact_vocabulary

    classifier = ["triangle", "circle", "star", "square"]
    cfg = _cfg(world, tmp_path / "run", label_config=None, labels=["circle", "square"], classifier_labels=classifier,
               augment=False,
               cache_features=True, max_steps=2, fit_label_embeddings=True)
    run = start_run(cfg)
    assert run.vocab.labels == classifier and run.vocab.is_base.tolist() == [False, True, False, True]
    example = run.dataset[0]
    names = {classifier[i] for i in example["labels"].tolist()}
    assert names and names <= {"circle", "square"}  # by name: indices 1 and 3, not the data's 0 and 1
    batch = to_device(collate_examples([example]), run.dev)
    out = run.step_module(batch)
    assert out["logits"].shape == (len(example["labels"]), 5)

    result = finetune(cfg)
    art = load_artifact(result.artifact)
    assert art.vocabulary.labels == classifier and art.vocabulary.is_base.tolist() == [False, True, False, True]
    text = artifact_vocabulary(load_artifact(world["artifact"]), classifier).embeddings
    moved = [not torch.allclose(art.vocabulary.embeddings[i].float(), text[i].float()) for i in range(4)]
    assert moved == [False, True, False, True]
    assert art.provenance["classifier"] == {"source": "labels", "labels": 4, "base": 2, "excluded": 0, "novel": 2}
    assert art.provenance["labels"] == ["circle", "square"]

    # A resumed run must train against the same classifier.
    with pytest.raises(ValueError, match="was trained on labels"):
        finetune(_cfg(world, tmp_path / "run", label_config=None, labels=["circle", "square"],
                      classifier_labels=classifier[:3] + ["square", "ring"], augment=False, cache_features=True,
                      max_steps=3, resume=True))


def test_a_training_label_outside_the_classifier_is_refused(world, tmp_path):
    argv = _cli_argv(world, tmp_path / "bad", "--max-steps", "1", "--classifier-labels", "circle,triangle,star")
    with pytest.raises(ValueError, match=r"\['square', 'ring', 'cross'\] not in the classifier vocabulary"):
        main_finetune(argv)  # the label config's labels: all six shapes
    with pytest.raises(ValueError, match="not both"):
        _cfg(world, tmp_path, classifier_vocabulary="coco", classifier_labels=["circle"])
    with pytest.raises(ValueError, match="unknown classifier vocabulary"):
        _cfg(world, tmp_path, classifier_vocabulary="coco80")


def test_cli_classifier_vocabulary_coco_trains_the_base_classes_against_all_80(world, tmp_path):
    """`--classifier-vocabulary coco` on a COCO file: the reference's 80 classes and texts, its 48 base classes the
    training labels (other classes' instances left out, as its 48_17 sub-split), its 15 excluded kept excluded; the
    artifact's vocabulary is the one `evaluate --reference-vocabulary coco` classifies against."""
    from ovsam.artifact import load_artifact
    from ovsam.class_texts import coco_reference_vocabulary
    from training.dataset import load_training_data
    from training.evaluate import reference_vocabulary

    data = make_synth(world["root"] / "coco-synth", num_images=3)
    names = {"circle": "person", "square": "cat", "triangle": "teddy bear", "star": "dog", "ring": "car",
             "cross": "hair drier"}  # base, novel, excluded, novel, base, excluded
    path = renamed_coco(data, names)
    cache = str(world["root"] / "vocab-cache")
    common = ["--base", str(world["artifact"]), "--data", str(path), "--batch-size", "1", "--max-steps", "1",
              "--no-augment", "--cache-features", "--val-fraction", "0", "--eval-prompts", "box", "--no-progress",
              "--no-tensorboard", "--cache-dir", cache, "--classifier-vocabulary", "coco"]
    assert main_finetune([*common, "--out", str(tmp_path / "coco")]) == 0
    ref = coco_reference_vocabulary()
    art = load_artifact(tmp_path / "coco" / "model.safetensors")
    vocab = art.vocabulary
    assert vocab.labels == list(ref.labels) and len(vocab) == 80
    assert {l for l, b in zip(vocab.labels, vocab.is_base.tolist()) if b} == set(ref.base)
    assert {l for l, e in zip(vocab.labels, vocab.excluded.tolist()) if e} == set(ref.excluded)
    assert vocab.synonyms[vocab.index("remote")] == ref.texts["remote"]
    assert art.provenance["classifier"] == {"source": "coco", "labels": 80, "base": 48, "excluded": 15, "novel": 17}
    assert art.metrics["val"]["box"]["per_class"].keys() <= {"person", "car"}
    samples = load_training_data(str(path)).samples
    expected, _, _ = reference_vocabulary(load_artifact(world["artifact"]), "coco", str(path), samples, Path(cache))
    assert torch.equal(vocab.embeddings, expected.embeddings)

    with pytest.raises(ValueError, match=r"\['teddy bear'\] are excluded classes of the classifier"):
        main_finetune([*common, "--out", str(tmp_path / "excl"), "--labels", "person,teddy bear"])
    with pytest.raises(ValueError, match="lvis vocabulary is read from an LVIS annotation file"):
        main_finetune([*common[:-1], "lvis", "--out", str(tmp_path / "lvis")])  # no r/c/f frequencies in the file


def test_cli_classifier_vocabulary_lvis_trains_common_and_frequent_against_all(world, tmp_path):
    """`--classifier-vocabulary lvis`: the --data file's categories with the reference's cleaned names; without
    --labels the common and frequent classes train (its norare setting) and the rare ones are novel."""
    from ovsam.artifact import load_artifact

    data = make_synth(world["root"] / "lvis-synth", num_images=2)
    names = {"circle": "aerosol_can", "square": "bow_(weapon)", "triangle": "tape_(sticky_cloth_or_paper)",
             "star": "Band_Aid", "ring": "CD_player", "cross": "iPod"}
    frequency = {"aerosol_can": "f", "bow_(weapon)": "r", "tape_(sticky_cloth_or_paper)": "c", "Band_Aid": "r",
                 "CD_player": "c", "iPod": "f"}
    path = renamed_coco(data, names, frequency)
    assert main_finetune(["--base", str(world["artifact"]), "--data", str(path), "--out", str(tmp_path / "lvis"),
                          "--batch-size", "1", "--max-steps", "1", "--no-augment", "--cache-features",
                          "--val-fraction", "0", "--eval-prompts", "", "--no-progress", "--no-tensorboard",
                          "--cache-dir", str(world["root"] / "vocab-cache"), "--classifier-vocabulary", "lvis"]) == 0
    art = load_artifact(tmp_path / "lvis" / "model.safetensors")
    vocab = art.vocabulary
    assert vocab.labels == list(names.values()) and not vocab.excluded.any()
    assert {l for l, b in zip(vocab.labels, vocab.is_base.tolist()) if not b} == {"bow_(weapon)", "Band_Aid"}
    assert vocab.synonyms[vocab.index("tape_(sticky_cloth_or_paper)")][0] == "tape (sticky cloth"
    assert art.provenance["labels"] == ["aerosol_can", "tape_(sticky_cloth_or_paper)", "CD_player", "iPod"]
