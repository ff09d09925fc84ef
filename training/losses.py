"""CLIP2SAM losses: cross-entropy over the K+1 cosine logits, and BCE + Dice on
PointRend-style uncertainty-sampled points of the low-resolution mask logits.

Sampling points instead of comparing whole masks keeps the loss cheap at 1024 px and focuses it on
the mask boundary. Normalisers are passed in (not computed here) so that DDP ranks can divide by
the global mean count and reproduce the 1-process loss exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

REFERENCE_POINTS = 12544  # points per mask at 1024 px (112²)


def default_num_points(image_size: int) -> int:
    """12544 at 1024 px, scaled with the image area (e.g. 196 at 128 px), at least 64."""
    return max(64, int(round(REFERENCE_POINTS * (image_size / 1024) ** 2)))


@dataclass(frozen=True)
class LossConfig:
    cls_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    background_weight: float = 0.1
    num_points: int = REFERENCE_POINTS
    oversample: float = 3.0
    importance: float = 0.75


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of [N, C, H, W] maps at [N, P, 2] (x, y) coordinates in [0, 1] -> [N, C, P]."""
    grid = 2.0 * coords.unsqueeze(2).to(inputs.dtype) - 1.0
    return F.grid_sample(inputs, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def sample_binary_masks(masks: torch.Tensor, index: torch.Tensor, coords: torch.Tensor, frame: int) -> torch.Tensor:
    """`point_sample` of GT masks without materialising float copies per prompt.

    masks: [M, h, w] uint8/bool, stored top-left in a `frame`×`frame` input (zero elsewhere);
    index: [N] which mask each prompt uses; coords: [N, P, 2] in [0, 1] of the frame.
    Returns [N, P] float, equal to grid_sample(align_corners=False, zero padding) on the padded masks.
    """
    m, h, w = masks.shape
    flat = masks.reshape(m, h * w)
    px = coords[..., 0].float() * frame - 0.5
    py = coords[..., 1].float() * frame - 0.5
    x0, y0 = torch.floor(px), torch.floor(py)
    wx, wy = px - x0, py - y0
    x0, y0 = x0.long(), y0.long()
    rows = index.view(-1, 1).expand_as(x0)
    out = torch.zeros_like(px)
    for dx, dy, weight in ((0, 0, (1 - wx) * (1 - wy)), (1, 0, wx * (1 - wy)), (0, 1, (1 - wx) * wy), (1, 1, wx * wy)):
        xs, ys = x0 + dx, y0 + dy
        inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
        lin = (ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1))
        vals = flat[rows, lin].float()
        out = out + torch.where(inside, vals * weight, torch.zeros_like(weight))
    return out


def random_coords(counts: Sequence[int], seeds: Sequence[int], sizes: Sequence[int], device: torch.device) -> List[torch.Tensor]:
    """For each size n in `sizes`: [sum(counts), n, 2] uniform points, drawn per image from its own seed.

    Per-image generators make a prompt's points independent of which rank or batch it lands in,
    which is what lets 2 DDP processes reproduce a 1-process run.
    """
    per_size: List[List[torch.Tensor]] = [[] for _ in sizes]
    for count, seed in zip(counts, seeds):
        g = torch.Generator().manual_seed(int(seed))
        for parts, n in zip(per_size, sizes):
            parts.append(torch.rand(int(count), n, 2, generator=g))
    return [torch.cat(p).to(device) if p else torch.zeros(0, n, 2, device=device) for p, n in zip(per_size, sizes)]


@torch.no_grad()
def uncertain_point_coords(
    logits: torch.Tensor, counts: Sequence[int], seeds: Sequence[int], num_points: int,
    oversample: float = 3.0, importance: float = 0.75,
) -> torch.Tensor:
    """mmdet's get_uncertain_point_coords_with_randomness: of oversample×num uniform points keep the
    importance×num with logits closest to 0, then add fresh uniform points. logits: [N, 1, h, w]."""
    n_sampled = int(num_points * oversample)
    n_uncertain = int(importance * num_points)
    coords, extra = random_coords(counts, seeds, (n_sampled, num_points - n_uncertain), logits.device)
    if logits.shape[0] == 0:
        return coords[:, :num_points]
    uncertainty = -point_sample(logits.float(), coords)[:, 0].abs()
    idx = uncertainty.topk(n_uncertain, dim=1).indices
    chosen = coords.gather(1, idx.unsqueeze(-1).expand(-1, -1, 2))
    return torch.cat([chosen, extra], dim=1)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, background_weight: float, normaliser: float) -> torch.Tensor:
    """Weighted CE over K+1 classes (background weight 0.1; no target is background, docs/REFERENCE_NOTES.md B5), summed / normaliser."""
    k1 = logits.shape[-1]
    weight = logits.new_ones(k1)
    weight[-1] = background_weight
    ce = F.cross_entropy(logits.float(), labels, weight=weight, reduction="none")
    return ce.sum() / normaliser


def mask_losses(pred: torch.Tensor, target: torch.Tensor, normaliser: float) -> Dict[str, torch.Tensor]:
    """BCE averaged over points and Dice (eps 1) per mask, both summed over masks / normaliser.

    pred: [M, P] logits at the sampled points; target: [M, P] in [0, 1].
    """
    pred = pred.float()
    bce = F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(dim=1)
    prob = pred.sigmoid()
    dice = 1 - (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)
    return {"mask": bce.sum() / normaliser, "dice": dice.sum() / normaliser}
