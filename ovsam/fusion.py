"""Base/novel-aware geometric-mean fusion of head and CLIP-branch logits, in log space."""
from __future__ import annotations

import torch
import torch.nn.functional as F

EXCLUDED_SCORE = -1000.0


def fuse_logits(
    head_logits: torch.Tensor,
    clip_logits: torch.Tensor,
    is_base: torch.Tensor,
    valid: torch.Tensor,
    alpha: float = 0.1,
    beta: float = 0.9,
    excluded: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused log-scores [N, K+1] = (1-w)·log softmax(head) + w·log softmax(clip).

    w is alpha for base classes and the background entry, beta for novel classes, and 0 where the CLIP
    branch is not `valid` (empty mask). Working with log_softmax and selecting the pure-head term with
    torch.where avoids the reference's log(0)·0 = NaN when a probability underflows (docs/REFERENCE_NOTES.md B7).
    is_base: [K] bool; valid: [N] bool; excluded: optional [K] bool of classes never predicted (-1000).
    """
    log_q = F.log_softmax(head_logits.float(), dim=-1)
    log_c = F.log_softmax(clip_logits.float(), dim=-1)
    base_with_bg = torch.cat([is_base.bool(), is_base.new_ones(1, dtype=torch.bool)])
    weight = torch.where(base_with_bg, torch.tensor(alpha), torch.tensor(beta)).to(log_q)
    weight = weight.expand_as(log_q) * valid.view(-1, *([1] * (log_q.dim() - 1))).to(log_q)
    mixed = (1 - weight) * log_q + weight * log_c
    score = torch.where(weight == 0, log_q, mixed)
    if excluded is not None:
        score = score.masked_fill(exclusion_mask(excluded), EXCLUDED_SCORE)
    return score


def exclusion_mask(excluded: torch.Tensor) -> torch.Tensor:
    """[K] excluded classes -> [K+1] mask over the scores (the background entry is never excluded)."""
    return torch.cat([excluded.bool(), excluded.new_zeros(1, dtype=torch.bool)])


def foreground_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """Probabilities over the K vocabulary classes (background can never be the output label)."""
    return F.softmax(scores[..., :-1], dim=-1)
