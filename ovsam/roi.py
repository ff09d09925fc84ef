"""RoI feature extraction with mmdet's SingleRoIExtractor level rule and mmcv's aligned RoIAlign."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torchvision.ops import roi_align


def map_roi_levels(rois: torch.Tensor, num_levels: int, finest_scale: float = 56.0) -> torch.Tensor:
    """Level per RoI: floor(log2(sqrt(area) / finest_scale + 1e-6)) clamped to [0, num_levels-1].

    rois: [N, 5] (batch index, x1, y1, x2, y2). torchvision's MultiScaleRoIAlign puts the epsilon
    elsewhere and uses aligned=False, so it is not used.
    """
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


def multi_level_roi_align(
    feats: Sequence[torch.Tensor],
    rois: torch.Tensor,
    output_size: int,
    strides: Sequence[int],
    finest_scale: float = 56.0,
) -> torch.Tensor:
    """RoIAlign each RoI on its own pyramid level; returns [N, C, output_size, output_size]."""
    levels = map_roi_levels(rois, len(feats), finest_scale)
    out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], output_size, output_size)
    for lvl, (feat, stride) in enumerate(zip(feats, strides)):
        idx = torch.nonzero(levels == lvl, as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        pooled = roi_align(
            feat, rois[idx].to(feat.dtype), output_size, spatial_scale=1.0 / stride, sampling_ratio=0, aligned=True
        )
        out[idx] = pooled.to(out.dtype)
    return out


def mask_occupancy(
    masks: torch.Tensor,
    rois: torch.Tensor,
    output_size: int,
    spatial_scale: float,
    mask_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Share of each RoI bin its mask covers: [N, 1, output_size, output_size], the weights of mask pooling.

    masks: [M, H, W] (bool, uint8 or float) in a frame `spatial_scale` times the rois' one; RoI n reads
    mask `mask_index[n]` (default: mask n). The bins are those of the features' RoIAlign, each averaged over
    its area (adaptive sampling), so a mask at any stride weighs the same feature bins.
    """
    index = torch.arange(rois.shape[0], device=rois.device) if mask_index is None else mask_index
    mask_rois = torch.cat([index.to(rois.device, torch.float32).view(-1, 1), rois[:, 1:].float()], dim=1)
    return roi_align(masks.unsqueeze(1).float(), mask_rois, output_size, spatial_scale=spatial_scale,
                     sampling_ratio=0, aligned=True)


def boxes_to_rois(boxes: torch.Tensor, batch_index: int | torch.Tensor = 0) -> torch.Tensor:
    """[N, 4] boxes -> [N, 5] rois with a batch index column."""
    if isinstance(batch_index, int):
        idx = boxes.new_full((boxes.shape[0], 1), float(batch_index))
    else:
        idx = batch_index.to(boxes.dtype).view(-1, 1)
    return torch.cat([idx, boxes], dim=1)


def masks_to_boxes_exclusive(masks: torch.Tensor) -> torch.Tensor:
    """mmdet's mask2bbox: [x_min, y_min, x_max+1, y_max+1] of each boolean mask; an empty mask gives zeros."""
    n, h, w = masks.shape
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    boxes = masks.new_zeros((n, 4), dtype=torch.float32)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    nonempty = rows.any(dim=1)
    if nonempty.any():
        r, c = rows[nonempty], cols[nonempty]
        y1 = torch.where(r, ar_h, h).min(dim=1).values
        y2 = torch.where(r, ar_h, -1).max(dim=1).values + 1
        x1 = torch.where(c, ar_w, w).min(dim=1).values
        x2 = torch.where(c, ar_w, -1).max(dim=1).values + 1
        boxes[nonempty] = torch.stack([x1, y1, x2, y2], dim=1).float()
    return boxes
