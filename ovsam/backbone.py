"""The frozen CLIP ResNet trunk: C2..C5 feature maps plus the attention pool used by the CLIP branch."""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from .config import OVSAMConfig


def build_clip_trunk(cfg: OVSAMConfig) -> ModifiedResNet:
    """open_clip's ModifiedResNet with the attribute names of its checkpoints (`conv1 … attnpool`)."""
    heads = cfg.clip_width * 32 // 64  # open_clip: vision_heads = width * 32 // head_width(64)
    return ModifiedResNet(
        layers=list(cfg.clip_layers),
        output_dim=cfg.clip_embed_dim,
        heads=heads,
        image_size=cfg.clip_image_size,
        width=cfg.clip_width,
    )


class CLIPTrunk(nn.Module):
    """Runs the CLIP ResNet up to layer4 and returns the raw outputs of layer1..layer4 (strides 4..32)."""

    def __init__(self, cfg: OVSAMConfig) -> None:
        super().__init__()
        self.visual = build_clip_trunk(cfg)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        v = self.visual
        x = v.stem(x)
        c2 = v.layer1(x)
        c3 = v.layer2(c2)
        c4 = v.layer3(c3)
        c5 = v.layer4(c4)
        return [c2, c3, c4, c5]

    def attention_pool(self, roi_feats: torch.Tensor) -> torch.Tensor:
        """CLIP's own image-level pooling applied to RoI features [N, C5, g, g] -> [N, embed_dim]."""
        return self.visual.attnpool(roi_feats)

    def key_value_maps(self, c5: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The attention pool's key/value projections of C5 (without bias), computed once per image.

        RoIAlign is a fixed linear combination of pixels per channel, so it commutes with these 1x1
        projections: pooling RoIs from these maps equals projecting the pooled C5, and a click then skips
        the two 3072x3072 projections of all 145 tokens (the CLIP branch is otherwise unchanged).
        """
        pool = self.visual.attnpool
        k = F.conv2d(c5, pool.k_proj.weight[:, :, None, None])
        v = F.conv2d(c5, pool.v_proj.weight[:, :, None, None])
        return k, v

    def _projected_positions(self, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """k/v projections of the positional embedding (+ bias): constants, so computed once per weights."""
        pool = self.visual.attnpool
        params = (pool.positional_embedding, pool.k_proj.weight, pool.k_proj.bias, pool.v_proj.weight, pool.v_proj.bias)
        key = (dtype, device, tuple((p.data_ptr(), p._version) for p in params))
        cached = getattr(self, "_pos_kv_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                pos = pool.positional_embedding.to(dtype)
                kv = (F.linear(pos, pool.k_proj.weight.to(dtype), pool.k_proj.bias.to(dtype)),
                      F.linear(pos, pool.v_proj.weight.to(dtype), pool.v_proj.bias.to(dtype)))
            cached = (key, kv)
            self._pos_kv_cache = cached
        return cached[1]

    def attention_pool_from_maps(
        self, roi_c5: torch.Tensor, roi_k: torch.Tensor, roi_v: torch.Tensor
    ) -> torch.Tensor:
        """attnpool(roi_c5) from RoI-pooled C5 and its pooled key/value maps: only the mean token queries."""
        pool = self.visual.attnpool
        n, c = roi_c5.shape[:2]
        pos = pool.positional_embedding.to(roi_c5.dtype)  # [1 + g*g, C]
        mean_c5 = roi_c5.flatten(2).mean(dim=2)  # the pooled "class" token
        k_tokens = torch.cat([roi_k.flatten(2).mean(dim=2, keepdim=True), roi_k.flatten(2)], dim=2).transpose(1, 2)
        v_tokens = torch.cat([roi_v.flatten(2).mean(dim=2, keepdim=True), roi_v.flatten(2)], dim=2).transpose(1, 2)
        pos_k, pos_v = self._projected_positions(roi_c5.dtype, roi_c5.device)
        k_tokens = k_tokens + pos_k
        v_tokens = v_tokens + pos_v
        q = F.linear(mean_c5 + pos[0], pool.q_proj.weight, pool.q_proj.bias)  # [N, C]
        heads = pool.num_heads
        d = c // heads
        q = q.view(n, heads, 1, d)
        k_tokens = k_tokens.view(n, -1, heads, d).transpose(1, 2)
        v_tokens = v_tokens.view(n, -1, heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k_tokens, v_tokens)  # [N, heads, 1, d]
        return pool.c_proj(out.reshape(n, c))
