"""Loading the released OVSAM / SAM / OpenCLIP key layouts into our model, strictly."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
from torch import nn

from ovsam import OVSAM, get_config
from ovsam import checkpoint as ck
from ovsam.checkpoint import CheckpointError

TINY = get_config("tiny")


@pytest.fixture
def tiny_files(tmp_path, official_layout) -> Dict[str, Path]:
    """Tiny-config checkpoints in the official layouts, saved like the released files."""
    states = {
        "sam2clip": official_layout.sam2clip(TINY),
        "clip2sam": official_layout.clip2sam(TINY),
        "sam": official_layout.sam(TINY),
        "clip": official_layout.open_clip(TINY),
    }
    paths = {}
    for name, state in states.items():
        paths[name] = tmp_path / f"{name}.pth"
        torch.save(state, paths[name])
    paths["states"] = states  # type: ignore[assignment]
    return paths


def _build(files, **changes) -> OVSAM:
    kwargs = dict(sam2clip=files["sam2clip"], clip2sam=files["clip2sam"], sam=files["sam"], clip=files["clip"])
    kwargs.update(changes)
    return ck.build_official_model(TINY, **kwargs)


def _save(tmp_path: Path, name: str, state) -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


# ---- full build ---------------------------------------------------------------------------------------
def test_build_official_model_sets_every_weight_from_its_file(tiny_files):
    model = _build(tiny_files)
    s2c, c2s, sam, clip = (tiny_files["states"][k] for k in ("sam2clip", "clip2sam", "sam", "clip"))
    sd = model.state_dict()
    expected = {
        # neck: released names kept, ConvTranspose2d weight is [in=C5, out=dim, 2, 2]
        "neck.patch_embeds.3.projection.weight": s2c["neck_student.patch_embeds.3.projection.weight"],
        "neck.patch_embeds.0.projection.bias": s2c["neck_student.patch_embeds.0.projection.bias"],
        "neck.blocks.1.attn.rel_pos_h": s2c["neck_student.blocks.1.attn.rel_pos_h"],
        "neck.neck.2.weight": s2c["neck_student.neck.2.weight"],
        "neck.pos_embed": s2c["neck_student.pos_embed"],  # from sam2clip, not SAM
        # head
        "head.mask_decoder.mask_tokens.weight": c2s["mask_decoder.mask_decoder.mask_tokens.weight"],
        "head.mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight":
            c2s["mask_decoder.mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight"],
        "head.mask_decoder.output_hypernetworks_mlps.0.layers.2.bias":
            c2s["mask_decoder.mask_decoder.output_hypernetworks_mlps.0.layers.2.bias"],
        "head.label_token.weight": c2s["mask_decoder.label_token.weight"],
        "head.label_mlp.layers.2.weight": c2s["mask_decoder.label_mlp.layers.2.weight"],
        "head.roi_conv.weight": c2s["mask_decoder.roi_conv.0.conv.weight"],
        "head.fpn.inner_blocks.2.0.bias": c2s["fpn_neck.lateral_convs.2.conv.bias"],
        "head.fpn.inner_blocks.3.0.weight": c2s["fpn_neck.lateral_convs.3.conv.weight"],
        "head.fpn.layer_blocks.1.0.weight": c2s["fpn_neck.fpn_convs.1.conv.weight"],
        # prompt encoder from SAM
        "prompt_encoder.point_embeddings.2.weight": sam["prompt_encoder.point_embeddings.2.weight"],
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix":
            sam["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"],
        "prompt_encoder.no_mask_embed.weight": sam["prompt_encoder.no_mask_embed.weight"],
        # trunk from open_clip
        "trunk.visual.conv1.weight": clip["visual.conv1.weight"],
        "trunk.visual.bn3.running_var": clip["visual.bn3.running_var"],
        "trunk.visual.layer4.0.downsample.0.weight": clip["visual.layer4.0.downsample.0.weight"],
        "trunk.visual.attnpool.positional_embedding": clip["visual.attnpool.positional_embedding"],
    }
    for key, value in expected.items():
        assert torch.equal(sd[key], value), key
    c5, dim = TINY.trunk_channels[3], TINY.neck_embed_dim
    assert isinstance(model.neck.patch_embeds[3].projection, nn.ConvTranspose2d)
    assert sd["neck.patch_embeds.3.projection.weight"].shape == (c5, dim, 2, 2)
    assert not model.training


def test_every_model_tensor_comes_from_a_file(tiny_files):
    """All four sources together cover the state dict exactly: no key is left at its initialisation."""
    model = _build(tiny_files)
    values = [v for s in tiny_files["states"].values() for v in s.values()]
    sources = {(tuple(v.shape), float(v.float().sum())) for v in values}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        assert (tuple(value.shape), float(value.float().sum())) in sources, key


def test_built_model_runs(tiny_files):
    model = _build(tiny_files)
    feats = model.encode_image(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    sparse, dense = model.encode_prompts(torch.tensor([[[10.0, 20.0]]]), torch.tensor([[1]]))
    assert model.decode(feats.embedding, sparse, dense).shape == (1, 1, TINY.low_res_size, TINY.low_res_size)


def test_pos_embed_falls_back_to_sam(tmp_path, tiny_files):
    s2c = dict(tiny_files["states"]["sam2clip"])
    del s2c["neck_student.pos_embed"]
    model = _build(tiny_files, sam2clip=_save(tmp_path, "no_pos.pth", s2c))
    assert torch.equal(model.neck.pos_embed, tiny_files["states"]["sam"]["image_encoder.pos_embed"])


def test_sam_is_required(tiny_files):
    with pytest.raises(FileNotFoundError, match="sam_vit_h_4b8939.pth"):
        _build(tiny_files, sam=None)


# ---- strictness ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "source, extra, named",
    [
        ("sam2clip", "neck_student.blocks.0.attn.extra", "neck.blocks.0.attn.extra"),  # maps, but not a model key
        ("sam2clip", "teacher.pos_embed", "teacher.pos_embed"),  # no neck_student. prefix
        ("clip2sam", "mask_decoder.cls_embed", "mask_decoder.cls_embed"),
        ("clip2sam", "mask_decoder.mask_decoder.iou_token.weight", "head.mask_decoder.iou_token.weight"),
        ("sam", "pixel_mean", "pixel_mean"),
        ("clip", "visual.proj", "trunk.visual.proj"),
        ("clip", "bogus", "bogus"),
    ],
)
def test_unexpected_key_is_named(tmp_path, tiny_files, source, extra, named):
    state = dict(tiny_files["states"][source])
    state[extra] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="unexpected") as info:
        _build(tiny_files, **{source: _save(tmp_path, f"{source}_extra.pth", state)})
    assert named in str(info.value)


def test_missing_key_is_named(tmp_path, tiny_files):
    state = dict(tiny_files["states"]["clip2sam"])
    del state["fpn_neck.fpn_convs.3.conv.bias"]
    with pytest.raises(CheckpointError, match="missing keys 1") as info:
        _build(tiny_files, clip2sam=_save(tmp_path, "c2s.pth", state))
    assert "head.fpn.layer_blocks.3.0.bias" in str(info.value)


def test_shape_mismatch_is_named(tmp_path, tiny_files):
    state = dict(tiny_files["states"]["clip2sam"])
    state["mask_decoder.roi_conv.0.conv.weight"] = torch.zeros(7, 3, 1, 1)
    with pytest.raises(CheckpointError, match="shape mismatches") as info:
        _build(tiny_files, clip2sam=_save(tmp_path, "c2s.pth", state))
    message = str(info.value)
    assert "head.roi_conv.weight [7, 3, 1, 1] vs model" in message


def test_long_key_lists_are_truncated_with_counts(tmp_path, tiny_files):
    state = {k: v for k, v in tiny_files["states"]["sam2clip"].items() if ".blocks." not in k}
    with pytest.raises(CheckpointError) as info:
        _build(tiny_files, sam2clip=_save(tmp_path, "s2c.pth", state))
    n_block_keys = sum(".blocks." in k for k in tiny_files["states"]["sam2clip"])
    assert f"missing keys {n_block_keys}:" in str(info.value)
    assert "more)" in str(info.value)


def test_a_text_only_or_foreign_clip_file_is_rejected(tmp_path, tiny_files):
    text_only = {k: v for k, v in tiny_files["states"]["clip"].items() if not k.startswith("visual.")}
    with pytest.raises(CheckpointError, match="no visual"):
        _build(tiny_files, clip=_save(tmp_path, "text.pth", text_only))


def test_clip_visual_missing_batchnorm_counters_is_fine(tmp_path, tiny_files):
    state = {k: v for k, v in tiny_files["states"]["clip"].items() if not k.endswith("num_batches_tracked")}
    _build(tiny_files, clip=_save(tmp_path, "clip.pth", state))


def test_map_sam_picks_parts(official_layout):
    state = official_layout.sam(TINY)
    only_pe = ck.map_sam(state)
    assert set(only_pe) == {k for k in state if k.startswith("prompt_encoder.")}  # image_encoder.blocks ignored
    full = ck.map_sam(state, parts=("prompt_encoder", "pos_embed", "mask_decoder"))
    assert torch.equal(full["neck.pos_embed"], state["image_encoder.pos_embed"])
    assert torch.equal(full["head.mask_decoder.mask_tokens.weight"], state["mask_decoder.mask_tokens.weight"][:1])
    assert not any("iou" in k or "output_hypernetworks_mlps.1." in k or "mlps.3." in k for k in full)
    # stage-2-from-scratch initialisation: the decoder loads strictly
    model = OVSAM(TINY)
    loaded = ck.load_into(model, {k: v for k, v in full.items() if k.startswith("head.mask_decoder.")}, ["head.mask_decoder."])
    assert len(loaded) == len([k for k in model.state_dict() if k.startswith("head.mask_decoder.")])
    with pytest.raises(ValueError, match="unknown SAM parts"):
        ck.map_sam(state, parts=("neck",))
    with pytest.raises(CheckpointError, match="no keys for"):
        ck.map_sam({"image_encoder.pos_embed": state["image_encoder.pos_embed"]})


def test_map_clip2sam_renames_mmdet_and_mmcv_keys():
    t = torch.zeros(1)
    mapped = ck.map_clip2sam({
        "mask_decoder.mask_decoder.output_upscaling.0.weight": t,
        "mask_decoder.label_token.weight": t,
        "mask_decoder.label_mlp.layers.1.bias": t,
        "mask_decoder.roi_conv.0.conv.weight": t,
        "fpn_neck.lateral_convs.0.conv.weight": t,
        "fpn_neck.fpn_convs.3.conv.bias": t,
    })
    assert sorted(mapped) == sorted([
        "head.mask_decoder.output_upscaling.0.weight", "head.label_token.weight", "head.label_mlp.layers.1.bias",
        "head.roi_conv.weight", "head.fpn.inner_blocks.0.0.weight", "head.fpn.layer_blocks.3.0.bias",
    ])
    with pytest.raises(CheckpointError, match="mask_decoder.roi_conv.0.conv.bias"):
        ck.map_clip2sam({"mask_decoder.roi_conv.0.conv.bias": t})


# ---- files --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module"])
def test_load_state_file_unwraps(tmp_path, official_layout, wrap):
    state = official_layout.clip2sam(TINY)
    obj = {
        "plain": state,
        "state_dict": {"meta": {"epoch": 12}, "state_dict": state},
        "model": {"model": state},
        "module": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    loaded = ck.load_state_file(_save(tmp_path, "x.pth", obj))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_wrapped_files_build(tmp_path, tiny_files):
    wrapped = _save(tmp_path, "wrapped.pth", {"state_dict": tiny_files["states"]["sam2clip"], "meta": {}})
    model = _build(tiny_files, sam2clip=wrapped)
    assert torch.equal(model.neck.level_encoding.weight, tiny_files["states"]["sam2clip"]["neck_student.level_encoding.weight"])


def test_load_state_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ck.load_state_file(tmp_path / "absent.pth")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        ck.load_state_file(_save(tmp_path, "list.pth", [torch.zeros(1)]))


def _torchscript_archive(state: Dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive whose state dict is `state`, like OpenAI's CLIP `.pt` files (fp16, int fields)."""
    root = nn.Module()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, nn.Module())
            module = getattr(module, name)
        module.register_buffer(leaf, value.clone())
    torch.jit.script(root).save(str(path))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_openai_torchscript_clip_file(tmp_path, tiny_files, official_layout):
    # open_clip's OpenAI loader infers text heads as width // 64, so this tower is 64 wide.
    cfg = TINY.replace(text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1})
    ref = official_layout.open_clip(cfg)
    state = {k: v.half() if v.is_floating_point() else v for k, v in ref.items()}
    state.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "RN50x16.pt"
    _torchscript_archive(state, path)
    loaded = ck.load_open_clip_file(path)
    assert loaded.keys() == ref.keys()
    assert torch.allclose(loaded["visual.conv1.weight"], ref["visual.conv1.weight"], atol=1e-2)
    assert loaded["visual.conv1.weight"].dtype == torch.float32
    model = ck.build_official_model(cfg, tiny_files["sam2clip"], tiny_files["clip2sam"], tiny_files["sam"], path)
    assert torch.allclose(model.trunk.visual.attnpool.c_proj.weight, ref["visual.attnpool.c_proj.weight"], atol=1e-2)


def test_clip_source_must_exist(tiny_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file nor"):
        _build(tiny_files, clip=str(tmp_path / "missing.bin"))


# ---- load_model ---------------------------------------------------------------------------------------
def test_load_model_official_directory(official_dir):
    art = ck.load_model(official_dir, cfg=TINY)
    assert art.vocabulary.labels == list(ck.COCO_CLASSES)
    base = [l for l, b in zip(art.vocabulary.labels, art.vocabulary.is_base.tolist()) if b]
    assert base == [l for l in ck.COCO_CLASSES if l in ck.COCO_BASE_CLASSES] and len(base) == 48
    assert art.version.endswith("-coco") and art.provenance["clip2sam"] == "clip2sam_coco_rn50x16.pth"
    assert art.provenance["clip"] == "open_clip_rn50x16.bin"
    assert art.text_encoder is not None
    clip = torch.load(official_dir / "open_clip_rn50x16.bin", weights_only=True)
    assert torch.equal(art.text_encoder.text.token_embedding.weight, clip["token_embedding.weight"])
    assert torch.equal(art.model.trunk.visual.conv1.weight, clip["visual.conv1.weight"])
    norms = art.vocabulary.embeddings.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
    # The reference's texts (173, one prototype each, padded to 17) and its 15 excluded classes.
    vocab = art.vocabulary
    assert vocab.synonyms[vocab.index("remote")] == ["tv remote", "remote control"]
    assert vocab.synonyms[vocab.index("orange")] == ["orange fruit"]
    assert sum(len(s) for s in vocab.synonyms) == 173 and vocab.embeddings.shape[1] == 17
    excluded = [l for l, e in zip(vocab.labels, vocab.excluded.tolist()) if e]
    assert len(excluded) == 15 and not set(excluded) & (set(ck.COCO_BASE_CLASSES) | set(ck.COCO_NOVEL_CLASSES))


def test_load_model_lvis_head_marks_all_labels_base(official_dir):
    (official_dir / "clip2sam_coco_rn50x16.pth").rename(official_dir / "clip2sam_lvis_rn50x16.pth")
    art = ck.load_model(official_dir, cfg=TINY, labels=["cat", "dog"])
    assert art.vocabulary.labels == ["cat", "dog"] and bool(art.vocabulary.is_base.all())
    assert art.version.endswith("-lvis") and not art.vocabulary.excluded.any()
    assert art.vocabulary.synonyms == [["cat"], ["dog"]]  # other label sets: their names


def test_load_model_stores_a_reference_vocabulary_with_its_split(official_dir):
    """An LVIS benchmark's classes: the official LVIS head was trained on the common and frequent ones."""
    from ovsam.class_texts import lvis_reference_vocabulary

    (official_dir / "clip2sam_coco_rn50x16.pth").rename(official_dir / "clip2sam_lvis_rn50x16.pth")
    cats = [{"id": 1, "name": "aerosol_can", "frequency": "f"}, {"id": 2, "name": "bow_(weapon)", "frequency": "r"},
            {"id": 3, "name": "CD_player", "frequency": "c"}]
    art = ck.load_model(official_dir, cfg=TINY, reference=lvis_reference_vocabulary(cats))
    assert art.vocabulary.labels == ["aerosol_can", "bow_(weapon)", "CD_player"]
    assert art.vocabulary.is_base.tolist() == [True, False, True] and not art.vocabulary.excluded.any()
    assert art.vocabulary.synonyms[1] == ["bow (weapon)"]


def test_lvis_preset_pools_head_rois_at_7_like_the_reference_lvis_config():
    lvis, coco = get_config("rn50x16_lvis"), get_config("rn50x16")
    assert lvis.head_roi_size == 7 and coco.head_roi_size == 12
    assert lvis.replace(head_roi_size=12, name=coco.name) == coco  # nothing else differs
    assert lvis.clip_roi_size == 12  # the CLIP branch keeps the attention pool's grid


def test_load_model_finds_other_clip_file_names(official_dir):
    (official_dir / "open_clip_rn50x16.bin").rename(official_dir / "open_clip_pytorch_model.bin")
    art = ck.load_model(official_dir, cfg=TINY, labels=["cat"])
    assert art.provenance["clip"] == "open_clip_pytorch_model.bin"


@pytest.mark.parametrize("name", ["sam_vit_h_4b8939.pth", "sam2clip_vith_rn50x16.pth", "clip2sam_coco_rn50x16.pth"])
def test_load_model_names_missing_files(official_dir, name):
    (official_dir / name).unlink()
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")) as info:
        ck.load_model(official_dir, cfg=TINY)
    assert "python -m ovsam download" in str(info.value)


def test_load_model_nothing_there(tmp_path):
    with pytest.raises(FileNotFoundError, match="no OVSAM checkpoint"):
        ck.load_model(tmp_path / "nope")


def test_load_model_artifact_file(tmp_path, official_dir):
    from ovsam.artifact import save_artifact

    art = ck.load_model(official_dir, cfg=TINY, labels=["cat", "dog", "person"])
    path = save_artifact(tmp_path / "m.safetensors", art.model, art.vocabulary, "v1", text_encoder=art.text_encoder)
    again = ck.load_model(path)
    assert again.version == "v1" and again.vocabulary.labels == ["cat", "dog", "person"]
    assert torch.equal(again.model.head.roi_conv.weight, art.model.head.roi_conv.weight)
    assert again.vocabulary.is_base.tolist() == [False, False, True]


def test_coco_split_constants():
    assert len(ck.COCO_CLASSES) == len(set(ck.COCO_CLASSES)) == 80
    assert len(set(ck.COCO_BASE_CLASSES)) == 48 and len(set(ck.COCO_NOVEL_CLASSES)) == 17
    assert not set(ck.COCO_BASE_CLASSES) & set(ck.COCO_NOVEL_CLASSES)
    assert set(ck.COCO_BASE_CLASSES) | set(ck.COCO_NOVEL_CLASSES) <= set(ck.COCO_CLASSES)


# ---- the official configuration, shapes only (meta tensors: nothing is allocated or run) ----------------
@pytest.fixture(scope="module")
def official_meta():
    cfg = get_config("rn50x16")
    with torch.device("meta"):
        model = OVSAM(cfg)
    return cfg, model


def test_official_key_counts_and_shapes(official_meta, official_layout):
    cfg, model = official_meta
    s2c = official_layout.sam2clip(cfg, meta=True)
    c2s = official_layout.clip2sam(cfg, meta=True)
    assert len(s2c) == 86  # 1 pos_embed + 1 level encoding + 8 patch embed + 5x14 block + 6 neck
    assert len([k for k in c2s if k.startswith("fpn_neck.")]) == 16
    assert len([k for k in c2s if k.startswith("mask_decoder.mask_decoder.")]) == 95
    assert len(c2s) == 95 + 1 + 6 + 1 + 16
    # parameter counts of the released files: SAM2CLIP 128.84 M (+ the 5.24 M pos_embed buffer), CLIP2SAM 7.867 M
    assert sum(v.numel() for k, v in s2c.items() if not k.endswith("pos_embed")) == 128_844_768
    assert s2c["neck_student.pos_embed"].numel() == 5_242_880
    assert sum(v.numel() for v in c2s.values()) == 7_867_008

    # the mapped files fit the model exactly (shapes checked by load_into; meta tensors copy nothing)
    loaded = ck.load_into(model, ck.map_sam2clip(s2c), ["neck."])
    loaded |= ck.load_into(model, ck.map_clip2sam(c2s), ["head."])
    loaded |= ck.load_into(model, ck.map_sam(official_layout.sam(cfg, meta=True)), ["prompt_encoder."])
    assert loaded == {k for k in model.state_dict() if k.startswith(("neck.", "head.", "prompt_encoder."))}

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    spec = {
        "neck.pos_embed": (1, 64, 64, 1280),
        "neck.level_encoding.weight": (4, 1280),
        "neck.patch_embeds.0.projection.weight": (1280, 384, 4, 4),
        "neck.patch_embeds.1.projection.weight": (1280, 768, 2, 2),
        "neck.patch_embeds.2.projection.weight": (1280, 1536, 1, 1),
        "neck.patch_embeds.3.projection.weight": (3072, 1280, 2, 2),
        "neck.blocks.0.attn.rel_pos_h": (27, 80),
        "neck.blocks.3.attn.rel_pos_w": (27, 80),
        "neck.blocks.4.attn.rel_pos_h": (127, 80),
        "neck.blocks.4.attn.rel_pos_w": (127, 80),
        "neck.blocks.2.attn.qkv.weight": (3840, 1280),
        "neck.blocks.2.attn.proj.weight": (1280, 1280),
        "neck.blocks.1.mlp.lin1.weight": (5120, 1280),
        "neck.blocks.1.mlp.lin2.weight": (1280, 5120),
        "neck.neck.0.weight": (256, 1280, 1, 1),
        "neck.neck.2.weight": (256, 256, 3, 3),
        "head.mask_decoder.mask_tokens.weight": (1, 256),
        "head.mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight": (128, 256),
        "head.mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight": (256, 128),
        "head.mask_decoder.transformer.layers.0.mlp.lin1.weight": (2048, 256),
        "head.mask_decoder.output_upscaling.0.weight": (256, 64, 2, 2),
        "head.mask_decoder.output_upscaling.3.weight": (64, 32, 2, 2),
        "head.mask_decoder.output_hypernetworks_mlps.0.layers.2.weight": (32, 256),
        "head.label_token.weight": (1, 256),
        "head.label_mlp.layers.2.weight": (768, 256),
        "head.roi_conv.weight": (768, 256, 1, 1),
        "head.fpn.inner_blocks.0.0.weight": (256, 384, 1, 1),
        "head.fpn.inner_blocks.3.0.weight": (256, 3072, 1, 1),
        "head.fpn.layer_blocks.2.0.weight": (256, 256, 3, 3),
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
        "prompt_encoder.point_embeddings.3.weight": (1, 256),
        "trunk.visual.conv1.weight": (48, 3, 3, 3),
        "trunk.visual.conv3.weight": (96, 48, 3, 3),
        "trunk.visual.attnpool.positional_embedding": (145, 3072),
        "trunk.visual.attnpool.c_proj.weight": (768, 3072),
    }
    for key, shape in spec.items():
        assert shapes[key] == shape, key
    assert not any("iou" in k for k in shapes)
    assert isinstance(model.neck.patch_embeds[3].projection, nn.ConvTranspose2d)
    assert [len(getattr(model.trunk.visual, f"layer{i}")) for i in range(1, 5)] == [6, 8, 18, 8]
