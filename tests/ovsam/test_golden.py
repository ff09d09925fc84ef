"""Our OVSAM against outputs of the reference code itself (fixtures/reference_golden, HarborYuan/ovsam @137d2c2).

The golden weights carry the released key names and are loaded through `ovsam.checkpoint`'s mappers, the ones
official checkpoints go through; each stage gets the golden inputs of that stage (`ovsam.reference_check`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from ovsam import OVSAM, get_config
from ovsam import checkpoint as ck
from ovsam.config import PIXEL_MEAN, PIXEL_STD
from ovsam.reference_check import GoldenSet, StageResult, build_model, compare_all

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "reference_golden"
STAGES = ("image", "neck", "fpn", "prompt_encoder", "decoder", "head", "clip_branch", "fusion", "recognise", "masks",
          "centre_point")


@pytest.fixture(scope="module")
def golden() -> GoldenSet:
    return GoldenSet.load(GOLDEN_DIR)


@pytest.fixture(scope="module")
def results(golden) -> Dict[str, List[StageResult]]:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run outside the suite's one-thread fixture
    try:
        compared = compare_all(golden)
    finally:
        torch.set_num_threads(threads)
    by_stage: Dict[str, List[StageResult]] = {}
    for r in compared:
        by_stage.setdefault(r.stage, []).append(r)
    return by_stage


@pytest.mark.parametrize("stage", STAGES)
def test_stage_matches_reference(results, stage):
    assert results.get(stage), f"no comparison ran for {stage}"
    bad = [f"{r.name}: max |diff| {r.max_abs_diff:.3g} > {r.tolerance:.3g} {r.note}" for r in results[stage] if not r.ok]
    assert not bad, "\n".join(bad)


def test_every_prompt_set_is_compared_at_every_per_prompt_stage(results, golden):
    for stage in ("prompt_encoder", "decoder", "head", "clip_branch", "fusion", "recognise"):
        names = {r.name.split(".")[0] for r in results[stage]}
        assert set(golden.prompt_sets) <= names, (stage, names)
    assert len(golden.prompt_sets) == 6


def test_golden_weights_land_where_the_mappers_put_them(golden):
    model = build_model(golden)
    sd = model.state_dict()
    w = golden.weights
    pairs = {
        "head.roi_conv.weight": "mask_decoder.roi_conv.0.conv.weight",
        "head.fpn.inner_blocks.2.0.weight": "fpn_neck.lateral_convs.2.conv.weight",
        "head.fpn.layer_blocks.3.0.bias": "fpn_neck.fpn_convs.3.conv.bias",
        "head.mask_decoder.transformer.layers.1.cross_attn_image_to_token.k_proj.weight":
            "mask_decoder.mask_decoder.transformer.layers.1.cross_attn_image_to_token.k_proj.weight",
        "head.label_token.weight": "mask_decoder.label_token.weight",
        "neck.patch_embeds.3.projection.weight": "neck_student.patch_embeds.3.projection.weight",
        "neck.pos_embed": "neck_student.pos_embed",
        "prompt_encoder.not_a_point_embed.weight": "prompt_encoder.not_a_point_embed.weight",
        "trunk.visual.attnpool.positional_embedding": "visual.attnpool.positional_embedding",
    }
    for ours, released in pairs.items():
        assert torch.equal(sd[ours], w[released]), ours
    assert len(w) == 16 + 103 + 86 + 17 + 9  # every released-name group of the golden README


def test_golden_config_is_the_official_preset_at_reduced_sizes(golden):
    cfg = golden.config()
    official = get_config("rn50x16")
    reduced = set(golden.meta["config"]["ovsam_config"]) - {"logit_scale_reference"}
    for field in ("logit_scale", "pixel_mean", "pixel_std", "use_clip_branch", "head_mask_pooling", "decoder_high_res"):
        assert field not in reduced and getattr(cfg, field) == getattr(official, field), field
    assert cfg.clip_roi_size == golden.meta["config"]["clip_branch"]["roi"]["output_size"]


def test_official_preset_has_the_reference_sizes(golden):
    """The official column of the golden README's size table (no parameters hold these, so no key test can)."""
    cfg = get_config("rn50x16")
    expected = dict(image_size=1024, clip_width=96, clip_layers=(6, 8, 18, 8), clip_image_size=384, clip_embed_dim=768,
                    neck_embed_dim=1280, neck_depth=5, neck_num_heads=16, neck_window_size=14,
                    neck_global_attn_indexes=(4,), prompt_embed_dim=256, decoder_depth=2, decoder_mlp_dim=2048,
                    decoder_num_heads=8, fpn_channels=256, head_roi_size=12, finest_scale=56.0, alpha=0.1, beta=0.9)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.clip_roi_size == 12  # attention pool grid: 384 / 32
    assert cfg.logit_scale == pytest.approx(math.exp(4.6052), rel=1e-7)
    assert cfg.pixel_mean == PIXEL_MEAN == tuple(golden.meta["image"]["mean"])
    assert cfg.pixel_std == PIXEL_STD == tuple(golden.meta["image"]["std"])


def test_reading_an_image_file_gives_the_reference_input_tensor(golden, tmp_path):
    """A PNG read by the CLI (cv2 reads BGR) and preprocessed equals the reference's input tensor."""
    import cv2

    from ovsam.cli import read_image

    rgb = golden["image.rgb"].numpy()
    path = tmp_path / "golden.png"
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))  # cv2 writes BGR arrays
    model = build_model(golden)
    x, frame = model.preprocess(read_image(str(path)))
    assert frame.resized_size == tuple(golden.meta["image"]["img_shape"])
    torch.testing.assert_close(x, golden["image.input"], rtol=0, atol=1e-5)


# ---- released key layout (official sizes) --------------------------------------------------------------------
def _released() -> Dict:
    return json.loads((GOLDEN_DIR / "released_keys.json").read_text())


def _meta_state(keys: List[Dict]) -> Dict[str, torch.Tensor]:
    return {k["key"]: torch.empty(k["shape"], device="meta") for k in keys}


@pytest.fixture(scope="module")
def official_meta_model() -> OVSAM:
    with torch.device("meta"):
        return OVSAM(get_config("rn50x16"))


@pytest.mark.parametrize("name", ["sam2clip_vith_rn50x16.pth", "clip2sam_coco_rn50x16.pth", "clip2sam_lvis_rn50x16.pth"])
def test_mapper_covers_exactly_the_released_keys_with_their_shapes(official_meta_model, name):
    entry = _released()[name]
    state = _meta_state(entry["keys"])
    assert len(state) == entry["num_keys"]
    assert sum(math.prod(t.shape) for t in state.values()) == entry["num_values"]
    if name.startswith("sam2clip"):
        mapped, prefixes = ck.map_sam2clip(state), ["neck."]
    else:
        mapped, prefixes = ck.map_clip2sam(state), ["head."]
    # Strict: every model key under the prefixes given, none unknown, every shape equal (CheckpointError otherwise).
    loaded = ck.load_into(official_meta_model, mapped, prefixes, source=name)
    own = {k for k in official_meta_model.state_dict() if k.startswith(tuple(prefixes))}
    assert loaded == own and len(loaded) == len(state)


def test_sam_prompt_encoder_and_decoder_initialisation_keys(official_meta_model):
    sam = _released()["sam_vit_h_4b8939.pth"]
    pe = _meta_state(sam["prompt_encoder"]["keys"])
    assert len(pe) == 17
    loaded = ck.load_into(official_meta_model, ck.map_sam(pe, ("prompt_encoder",)), ["prompt_encoder."], source="SAM")
    assert loaded == {k for k in official_meta_model.state_dict() if k.startswith("prompt_encoder.")}

    decoder = sam["mask_decoder"]
    file_state = _meta_state(decoder["file_keys"])
    mapped = ck.map_sam(file_state, ("mask_decoder",))
    kept = {f"head.mask_decoder.{k['key'].split('.', 1)[1]}": k["shape"] for k in decoder["kept_keys"]}
    assert {k: list(v.shape) for k, v in mapped.items()} == kept
    for key, shapes in decoder["sliced"].items():
        assert list(mapped[f"head.mask_decoder.{key}"].shape) == shapes["read_shape"]
    own = {k for k in official_meta_model.state_dict() if k.startswith("head.mask_decoder.")}
    assert set(kept) == own  # the reference keeps exactly what our single-mask, IoU-free decoder has
