"""Checkpoints in the *released* key layouts, built for any config.

They are written from the released files' key names, not from `ovsam.checkpoint`'s mappers, so loading them checks the
mapping. Values are seeded random tensors (or meta tensors, for shape-only checks of the official config).
Tests reach the builders through the `official_layout` fixture (pytest's importlib mode cannot import conftest).
"""
from __future__ import annotations

import types
from typing import Dict, Optional, Sequence, Tuple

import pytest
import torch

from ovsam.config import OVSAMConfig

State = Dict[str, torch.Tensor]


class _Maker:
    """Seeded random tensors, or shape-only meta tensors."""

    def __init__(self, seed: int, meta: bool) -> None:
        self.meta = meta
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int) -> torch.Tensor:
        if self.meta:
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=self.gen)


def _linear(state: State, t: _Maker, key: str, out_dim: int, in_dim: int, bias: bool = True) -> None:
    state[f"{key}.weight"] = t(out_dim, in_dim)
    if bias:
        state[f"{key}.bias"] = t(out_dim)


def _norm(state: State, t: _Maker, key: str, dim: int) -> None:
    state[f"{key}.weight"] = t(dim)
    state[f"{key}.bias"] = t(dim)


def _mlp(state: State, t: _Maker, key: str, dims: Sequence[int]) -> None:
    """segment_anything's MLP: `layers.i` Linear(dims[i] -> dims[i+1])."""
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        _linear(state, t, f"{key}.layers.{i}", b, a)


def _attention(state: State, t: _Maker, key: str, dim: int, internal: int) -> None:
    for name in ("q_proj", "k_proj", "v_proj"):
        _linear(state, t, f"{key}.{name}", internal, dim)
    _linear(state, t, f"{key}.out_proj", dim, internal)


def _two_way_decoder(state: State, t: _Maker, prefix: str, cfg: OVSAMConfig, num_mask_tokens: int) -> None:
    """SAM's MaskDecoder without the IoU parts: transformer, mask tokens, upscaling, hypernets."""
    d = cfg.prompt_embed_dim
    for i in range(cfg.decoder_depth):
        layer = f"{prefix}transformer.layers.{i}"
        _attention(state, t, f"{layer}.self_attn", d, d)
        _attention(state, t, f"{layer}.cross_attn_token_to_image", d, d // 2)
        _attention(state, t, f"{layer}.cross_attn_image_to_token", d, d // 2)
        _linear(state, t, f"{layer}.mlp.lin1", cfg.decoder_mlp_dim, d)
        _linear(state, t, f"{layer}.mlp.lin2", d, cfg.decoder_mlp_dim)
        for n in range(1, 5):
            _norm(state, t, f"{layer}.norm{n}", d)
    _attention(state, t, f"{prefix}transformer.final_attn_token_to_image", d, d // 2)
    _norm(state, t, f"{prefix}transformer.norm_final_attn", d)
    state[f"{prefix}mask_tokens.weight"] = t(num_mask_tokens, d)
    state[f"{prefix}output_upscaling.0.weight"] = t(d, d // 4, 2, 2)
    state[f"{prefix}output_upscaling.0.bias"] = t(d // 4)
    _norm(state, t, f"{prefix}output_upscaling.1", d // 4)
    state[f"{prefix}output_upscaling.3.weight"] = t(d // 4, d // 8, 2, 2)
    state[f"{prefix}output_upscaling.3.bias"] = t(d // 8)
    for i in range(num_mask_tokens):
        _mlp(state, t, f"{prefix}output_hypernetworks_mlps.{i}", (d, d, d, d // 8))


def _rel_pos_len(cfg: OVSAMConfig, block: int) -> int:
    size = cfg.embedding_size if block in cfg.neck_global_attn_indexes else cfg.neck_window_size
    return 2 * size - 1


def official_sam2clip_state(cfg: OVSAMConfig, seed: int = 1, meta: bool = False) -> State:
    """`sam2clip_vith_rn50x16.pth`: `neck_student.*`."""
    t, p, s = _Maker(seed, meta), "neck_student.", {}
    dim, g, head_dim = cfg.neck_embed_dim, cfg.embedding_size, cfg.neck_embed_dim // cfg.neck_num_heads
    s[f"{p}pos_embed"] = t(1, g, g, dim)
    s[f"{p}level_encoding.weight"] = t(4, dim)
    for i, (c, stride) in enumerate(zip(cfg.trunk_channels, (4, 8, 16, 32))):
        if stride <= 16:
            k = 16 // stride
            s[f"{p}patch_embeds.{i}.projection.weight"] = t(dim, c, k, k)
        else:  # ConvTranspose2d: [in, out, k, k]
            k = stride // 16
            s[f"{p}patch_embeds.{i}.projection.weight"] = t(c, dim, k, k)
        s[f"{p}patch_embeds.{i}.projection.bias"] = t(dim)
    for b in range(cfg.neck_depth):
        blk = f"{p}blocks.{b}"
        _norm(s, t, f"{blk}.norm1", dim)
        _norm(s, t, f"{blk}.norm2", dim)
        _linear(s, t, f"{blk}.attn.qkv", 3 * dim, dim)
        _linear(s, t, f"{blk}.attn.proj", dim, dim)
        s[f"{blk}.attn.rel_pos_h"] = t(_rel_pos_len(cfg, b), head_dim)
        s[f"{blk}.attn.rel_pos_w"] = t(_rel_pos_len(cfg, b), head_dim)
        _linear(s, t, f"{blk}.mlp.lin1", 4 * dim, dim)
        _linear(s, t, f"{blk}.mlp.lin2", dim, 4 * dim)
    out = cfg.prompt_embed_dim
    s[f"{p}neck.0.weight"] = t(out, dim, 1, 1)
    _norm(s, t, f"{p}neck.1", out)
    s[f"{p}neck.2.weight"] = t(out, out, 3, 3)
    _norm(s, t, f"{p}neck.3", out)
    return s


def official_clip2sam_state(cfg: OVSAMConfig, seed: int = 2, meta: bool = False) -> State:
    """`clip2sam_{coco,lvis}_rn50x16.pth`: `mask_decoder.*` + `fpn_neck.*`."""
    t, s = _Maker(seed, meta), {}
    d, e, f = cfg.prompt_embed_dim, cfg.clip_embed_dim, cfg.fpn_channels
    _two_way_decoder(s, t, "mask_decoder.mask_decoder.", cfg, num_mask_tokens=1)
    s["mask_decoder.label_token.weight"] = t(1, d)
    _mlp(s, t, "mask_decoder.label_mlp", (d, d, d, e))
    s["mask_decoder.roi_conv.0.conv.weight"] = t(e, f, 1, 1)
    for i, c in enumerate(cfg.trunk_channels):
        s[f"fpn_neck.lateral_convs.{i}.conv.weight"] = t(f, c, 1, 1)
        s[f"fpn_neck.lateral_convs.{i}.conv.bias"] = t(f)
        s[f"fpn_neck.fpn_convs.{i}.conv.weight"] = t(f, f, 3, 3)
        s[f"fpn_neck.fpn_convs.{i}.conv.bias"] = t(f)
    return s


def sam_checkpoint_state(cfg: OVSAMConfig, seed: int = 3, meta: bool = False) -> State:
    """A SAM checkpoint like `sam_vit_h_4b8939.pth`: prompt encoder, image encoder (pos_embed + a block),
    and the full multi-output mask decoder (4 mask tokens, IoU token/head, 4 hypernets)."""
    t, s = _Maker(seed, meta), {}
    d, dim, g = cfg.prompt_embed_dim, cfg.neck_embed_dim, cfg.embedding_size
    s["image_encoder.pos_embed"] = t(1, g, g, dim)
    s["image_encoder.patch_embed.proj.weight"] = t(dim, 3, 16, 16)
    _norm(s, t, "image_encoder.blocks.0.norm1", dim)
    _linear(s, t, "image_encoder.blocks.0.attn.qkv", 3 * dim, dim)
    p = "prompt_encoder."
    s[f"{p}pe_layer.positional_encoding_gaussian_matrix"] = t(2, d // 2)
    for i in range(4):
        s[f"{p}point_embeddings.{i}.weight"] = t(1, d)
    s[f"{p}not_a_point_embed.weight"] = t(1, d)
    s[f"{p}mask_downscaling.0.weight"] = t(4, 1, 2, 2)
    s[f"{p}mask_downscaling.0.bias"] = t(4)
    _norm(s, t, f"{p}mask_downscaling.1", 4)
    s[f"{p}mask_downscaling.3.weight"] = t(16, 4, 2, 2)
    s[f"{p}mask_downscaling.3.bias"] = t(16)
    _norm(s, t, f"{p}mask_downscaling.4", 16)
    s[f"{p}mask_downscaling.6.weight"] = t(d, 16, 1, 1)
    s[f"{p}mask_downscaling.6.bias"] = t(d)
    s[f"{p}no_mask_embed.weight"] = t(1, d)
    _two_way_decoder(s, t, "mask_decoder.", cfg, num_mask_tokens=4)
    s["mask_decoder.iou_token.weight"] = t(1, d)
    _mlp(s, t, "mask_decoder.iou_prediction_head", (d, 256, 256, 4))
    return s


def open_clip_model(cfg: OVSAMConfig, seed: int = 4):
    """An open_clip CLIP built from the config's sizes (ResNet vision tower, the config's text tower)."""
    from open_clip.model import CLIP, CLIPVisionCfg

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=tuple(cfg.clip_layers), width=cfg.clip_width, image_size=cfg.clip_image_size)
    model = CLIP(cfg.clip_embed_dim, vision, dict(cfg.text_cfg or {}), quick_gelu=True)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a load that skips them is visible
        for name, buf in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.uniform_(0.5, 1.5)
    return model


def open_clip_state(cfg: OVSAMConfig, seed: int = 4) -> State:
    """A whole open_clip CLIP state dict (visual.* + text tower + logit_scale)."""
    return dict(open_clip_model(cfg, seed).state_dict())


@pytest.fixture(scope="session")
def official_layout() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        sam2clip=official_sam2clip_state,
        clip2sam=official_clip2sam_state,
        sam=sam_checkpoint_state,
        open_clip=open_clip_state,
        open_clip_model=open_clip_model,
    )


def write_official_dir(directory, cfg: OVSAMConfig, clip_name: Optional[str] = "open_clip_rn50x16.bin",
                       clip2sam_name: str = "clip2sam_coco_rn50x16.pth") -> Tuple[str, ...]:
    """The official file set for `cfg` in `directory` (as `python -m ovsam download` leaves it)."""
    files = {
        "sam2clip_vith_rn50x16.pth": official_sam2clip_state(cfg),
        clip2sam_name: official_clip2sam_state(cfg),
        "sam_vit_h_4b8939.pth": sam_checkpoint_state(cfg),
    }
    if clip_name:
        files[clip_name] = open_clip_state(cfg)
    for name, state in files.items():
        torch.save(state, directory / name)
    return tuple(files)


@pytest.fixture
def official_dir(tmp_path, monkeypatch):
    """A directory of tiny official-layout files, plus a private vocabulary cache."""
    from ovsam.config import get_config

    monkeypatch.setenv("OVSAM_CACHE_DIR", str(tmp_path / "cache"))
    directory = tmp_path / "official"
    directory.mkdir()
    write_official_dir(directory, get_config("tiny"))
    return directory
