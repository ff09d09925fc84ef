"""CLIP2SAM: SAM's mask decoder with a label token, plus the FPN + RoIAlign recognition head."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from segment_anything.modeling.mask_decoder import MLP
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from .config import OVSAMConfig
from .roi import multi_level_roi_align

FPN_STRIDES = (4, 8, 16, 32)
MIN_MASK_WEIGHT = 1e-3  # summed bin occupancy below which mask pooling falls back to the box average


def cosine_logits(features: torch.Tensor, text_embeddings: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · max over prototypes of cos(feature, text), with an all-zero background class appended.

    features: [N, D]; text_embeddings: [K, P, D] unit-norm. Returns [N, K+1]; the background logit is 0.
    """
    feats = F.normalize(features.float(), dim=-1)
    cos = torch.einsum("nd,kpd->nkp", feats, text_embeddings.float().to(feats.device)).amax(dim=-1)
    return torch.cat([cos * scale, cos.new_zeros(cos.shape[0], 1)], dim=1)


class CLIP2SAMHead(nn.Module):
    """Decodes one mask per prompt and classifies it from FPN RoI features of the CLIP trunk."""

    def __init__(self, cfg: OVSAMConfig) -> None:
        super().__init__()
        dim = cfg.prompt_embed_dim
        self.mask_decoder = MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth, embedding_dim=dim, mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_num_heads
            ),
            num_multimask_outputs=0,
        )
        # OVSAM has no IoU branch; removing it makes strict loading of the released weights possible.
        del self.mask_decoder.iou_token
        del self.mask_decoder.iou_prediction_head
        self.label_token = nn.Embedding(1, dim)
        # Kept for the released key layout only: its output is multiplied by 0 in the reference (docs/REFERENCE_NOTES.md B3).
        self.label_mlp = MLP(dim, dim, cfg.clip_embed_dim, 3)
        self.label_mlp.requires_grad_(False)
        if cfg.decoder_high_res:
            self.add_high_res_projections(cfg)
        self.fpn = FeaturePyramidNetwork(list(cfg.trunk_channels), cfg.fpn_channels)
        self.roi_conv = nn.Conv2d(cfg.fpn_channels, cfg.clip_embed_dim, kernel_size=1, bias=False)
        self.roi_size = cfg.head_roi_size
        self.finest_scale = cfg.finest_scale
        self.logit_scale = cfg.logit_scale

    def add_high_res_projections(self, cfg: OVSAMConfig) -> None:
        """1x1 convs C3 -> dim/4 and C2 -> dim/8 channels for the decoder's upscaling (`decoder_high_res`).

        They live in the mask decoder, so freezing the decoder freezes them. Zero-initialised: a trained
        decoder that gains them draws the same masks until they are trained.
        """
        dim = cfg.prompt_embed_dim
        c2, c3 = cfg.trunk_channels[:2]
        proj = nn.ModuleList([nn.Conv2d(c3, dim // 4, kernel_size=1), nn.Conv2d(c2, dim // 8, kernel_size=1)])
        for conv in proj:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.mask_decoder.high_res_proj = proj.to(self.label_token.weight.device)

    @property
    def reads_high_res(self) -> bool:
        """Whether the decoder has the high-resolution projections (`decoder_high_res`, or added by a fine-tune)."""
        return hasattr(self.mask_decoder, "high_res_proj")

    def high_res_features(self, clip_feats: Sequence[torch.Tensor]) -> Optional[List[torch.Tensor]]:
        """[stride-8, stride-4] maps for `decode_masks` from C2, C3 (C4, C5 may follow), or None without them."""
        if not self.reads_high_res:
            return None
        proj = self.mask_decoder.high_res_proj
        return [proj[0](clip_feats[1]), proj[1](clip_feats[0])]

    def pyramid(self, clip_feats: List[torch.Tensor]) -> List[torch.Tensor]:
        """P2..P5 from C2..C5."""
        out = self.fpn({str(i): f for i, f in enumerate(clip_feats)})
        return [out[str(i)] for i in range(len(clip_feats))]

    def decode_masks(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        image_index: torch.Tensor | None = None,
        high_res: Optional[Sequence[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Low-res mask logits [N, 1, 4g, 4g]; tokens are [label, mask, prompts…] (SAM's IoU slot -> label).

        image_embedding: [B, C, g, g]; image_index: [N] which image each prompt belongs to (default 0);
        high_res: `high_res_features` of the same B images, required with `decoder_high_res`.
        """
        dec = self.mask_decoder
        if self.reads_high_res and high_res is None:
            raise ValueError("this model's decoder reads high-resolution trunk maps: pass high_res")
        n = sparse.shape[0]
        tokens = torch.cat([self.label_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        if image_index is None:
            src = image_embedding[:1].expand(n, -1, -1, -1)
        else:
            src = image_embedding[image_index]
        src = src + dense
        pos = image_pe.expand(n, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = dec.transformer(src, pos, tokens)
        mask_token_out = hs[:, 1]
        src = src.transpose(1, 2).reshape(b, c, h, w)
        if self.reads_high_res:
            s8, s4 = (f[:1].expand(n, -1, -1, -1) if image_index is None else f[image_index] for f in high_res)
            up1, norm, act1, up2, act2 = dec.output_upscaling
            upscaled = act2(up2(act1(norm(up1(src) + s8))) + s4)
        else:
            upscaled = dec.output_upscaling(src)
        hyper = dec.output_hypernetworks_mlps[0](mask_token_out)
        bu, cu, hu, wu = upscaled.shape
        return (hyper.unsqueeze(1) @ upscaled.view(bu, cu, hu * wu)).view(bu, 1, hu, wu)

    def roi_embeddings(self, pyramid: Sequence[torch.Tensor], rois: torch.Tensor,
                       weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[N, 5] rois in input pixels -> [N, clip_embed_dim] recognition features.

        weights: [N, 1, S, S] mask occupancy of the RoI bins (`mask_occupancy`) for mask pooling; a RoI
        whose mask covers (almost) nothing, e.g. a box-only annotation, falls back to the box average.
        """
        pooled = multi_level_roi_align(pyramid, rois, self.roi_size, FPN_STRIDES, self.finest_scale)
        feats = F.relu(self.roi_conv(pooled))
        if weights is None:
            return feats.mean(dim=(2, 3))
        w = weights.to(feats.dtype)
        empty = w.sum(dim=(2, 3), keepdim=True) < MIN_MASK_WEIGHT
        w = torch.where(empty, torch.ones_like(w), w)
        return (feats * w).sum(dim=(2, 3)) / w.sum(dim=(2, 3))

    def classify(self, pyramid: Sequence[torch.Tensor], rois: torch.Tensor, text_embeddings: torch.Tensor,
                 weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Head class logits [N, K+1]."""
        return cosine_logits(self.roi_embeddings(pyramid, rois, weights), text_embeddings, self.logit_scale)
