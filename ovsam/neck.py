"""SAM2CLIP: the adapter that turns CLIP C2..C5 into a SAM-like 256×64×64 image embedding."""
from __future__ import annotations

from typing import List, Sequence

import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Block
from torch import nn
from torch.nn import functional as F

from .config import OVSAMConfig


class LevelProjection(nn.Module):
    """Projects one pyramid level to the stride-16 grid; the `projection` name matches the released keys."""

    def __init__(self, projection: nn.Module) -> None:
        super().__init__()
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


def _level_projection(in_ch: int, out_ch: int, stride: int, target_stride: int = 16) -> LevelProjection:
    if stride < target_stride:
        k = target_stride // stride
        return LevelProjection(nn.Conv2d(in_ch, out_ch, kernel_size=k, stride=k))
    if stride == target_stride:
        return LevelProjection(nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=1))
    k = stride // target_stride
    return LevelProjection(nn.ConvTranspose2d(in_ch, out_ch, kernel_size=k, stride=k))


class SAM2CLIPNeck(nn.Module):
    """Level projections summed with a level encoding, SAM's position embedding, ViT blocks, SAM's output neck."""

    def __init__(self, cfg: OVSAMConfig, strides: Sequence[int] = (4, 8, 16, 32)) -> None:
        super().__init__()
        dim, grid = cfg.neck_embed_dim, cfg.embedding_size
        self.patch_embeds = nn.ModuleList(
            _level_projection(c, dim, s) for c, s in zip(cfg.trunk_channels, strides)
        )
        self.level_encoding = nn.Embedding(len(strides), dim)
        nn.init.normal_(self.level_encoding.weight)
        # Copied from SAM's image encoder when distillation starts; frozen (a buffer, as released).
        self.register_buffer("pos_embed", torch.zeros(1, grid, grid, dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=dim,
                num_heads=cfg.neck_num_heads,
                mlp_ratio=4.0,
                qkv_bias=True,
                norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6),
                act_layer=nn.GELU,
                use_rel_pos=True,
                rel_pos_zero_init=True,
                window_size=0 if i in cfg.neck_global_attn_indexes else cfg.neck_window_size,
                input_size=(grid, grid),
            )
            for i in range(cfg.neck_depth)
        )
        out = cfg.prompt_embed_dim
        self.neck = nn.Sequential(
            nn.Conv2d(dim, out, kernel_size=1, bias=False),
            LayerNorm2d(out),
            nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out),
        )

    @torch.no_grad()
    def resize_grid(self, grid: int) -> None:
        """Take a stride-16 grid of another side: the position embedding resampled (bicubic) and the
        global-attention blocks' relative positions resampled as SAM's `get_rel_pos` would (linear), so the
        weights keep their meaning and the module matches a freshly built one of that grid."""
        pe = self.pos_embed.permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=(grid, grid), mode="bicubic", align_corners=False)
        self.pos_embed = pe.permute(0, 2, 3, 1).contiguous()
        for block in self.blocks:
            if block.window_size:  # windowed blocks see window_size x window_size whatever the grid
                continue
            attn = block.attn
            for name in ("rel_pos_h", "rel_pos_w"):
                old = getattr(attn, name)
                new = F.interpolate(old.t()[None], size=2 * grid - 1, mode="linear")[0].t()
                setattr(attn, name, nn.Parameter(new.contiguous(), requires_grad=old.requires_grad))

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        x = None
        for i, (proj, f) in enumerate(zip(self.patch_embeds, feats)):
            level = proj(f).permute(0, 2, 3, 1) + self.level_encoding.weight[i]
            x = level if x is None else x + level
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
