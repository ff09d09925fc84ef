"""The frozen CLIP ResNet trunk: C2..C5 feature maps plus the attention pool used by the CLIP branch."""
from __future__ import annotations

from typing import List

import torch
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
