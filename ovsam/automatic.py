"""Automatic mode: segment and recognise everything from a grid of point prompts.

The head has no IoU output, so a mask is kept on its stability score and the recognition confidence;
duplicates are removed with box NMS and small fragments by a minimum area (SAM's recipe otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from segment_anything.utils.amg import batched_mask_to_box, build_point_grid, calculate_stability_score
from torchvision.ops import batched_nms

from .fusion import foreground_probabilities
from .model import ImageFeatures
from .predictor import LabelScore, OVSAMPredictor
from .transforms import upscale_mask_logits


@dataclass
class Instance:
    mask: np.ndarray  # [H0, W0] bool
    label: str
    label_index: int
    probability: float
    top_k: List[LabelScore]
    stability: float
    score: float  # stability × probability
    box: np.ndarray  # [4] x1, y1, x2, y2 original pixels
    area: int


@dataclass
class AutomaticConfig:
    points_per_side: int = 16
    points_per_batch: int = 64
    stability_threshold: float = 0.9
    stability_offset: float = 1.0
    confidence_threshold: float = 0.5
    nms_iou: float = 0.7
    min_area_fraction: float = 0.0005  # of the image area
    max_instances: int = 100
    top_k: int = 5


class AutomaticMaskGenerator:
    """Runs the predictor's decoder and recogniser over a point grid and keeps the good, distinct masks."""

    def __init__(self, predictor: OVSAMPredictor, config: Optional[AutomaticConfig] = None) -> None:
        self.predictor = predictor
        self.config = config or AutomaticConfig()

    def generate(self, features: ImageFeatures) -> List[Instance]:
        cfg, pred = self.config, self.predictor
        model, vocab, dev = pred.model, pred.vocabulary, pred.device
        frame = features.frame
        h, w = frame.resized_size
        # Grid over the resized image region only (never over the padding), in input pixels.
        grid = torch.as_tensor(build_point_grid(cfg.points_per_side), dtype=torch.float32) * torch.tensor([w, h])
        kept_logits, kept_scores, kept_boxes, kept_probs, kept_stab = [], [], [], [], []
        # The device lock is taken per batch of points, so a click waiting for the device gets it between batches.
        for start in range(0, len(grid), cfg.points_per_batch):
            with pred.inference():
                pts = grid[start : start + cfg.points_per_batch].to(dev)[:, None, :]
                labels = torch.ones(pts.shape[:2], dtype=torch.long, device=dev)
                sparse, dense = model.encode_prompts(pts, labels)
                low_res = model.decode(features.embedding, sparse, dense, high_res=features.high_res).float()
                stability = calculate_stability_score(low_res[:, 0], 0.0, cfg.stability_offset)
                rec = model.recognise(
                    features.pyramid, features.c5, low_res, vocab.embeddings.to(dev), vocab.is_base.to(dev),
                    clip_kv=features.clip_kv,
                )
                probs = foreground_probabilities(rec.scores.float())
                conf = probs.max(dim=-1).values
                keep = (stability >= cfg.stability_threshold) & (conf >= cfg.confidence_threshold)
                if keep.any():
                    kept_logits.append(low_res[keep])
                    kept_boxes.append(batched_mask_to_box(low_res[keep][:, 0] > 0).float())
                    kept_scores.append((stability * conf)[keep])
                    kept_probs.append(probs[keep])
                    kept_stab.append(stability[keep])
        if not kept_logits:
            return []
        logits, boxes = torch.cat(kept_logits), torch.cat(kept_boxes)
        scores, probs, stab = torch.cat(kept_scores), torch.cat(kept_probs), torch.cat(kept_stab)
        keep = batched_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.long), cfg.nms_iou)
        keep = keep[: cfg.max_instances * 2]
        min_area = cfg.min_area_fraction * frame.original_size[0] * frame.original_size[1]
        k = min(cfg.top_k, len(vocab))
        out: List[Instance] = []
        for i in keep.tolist():
            mask = (upscale_mask_logits(logits[i : i + 1], frame)[0] > 0).cpu().numpy()
            area = int(mask.sum())
            if area < max(min_area, 1):
                continue
            top_p, top_i = probs[i].topk(k)
            top = [LabelScore(vocab.labels[int(j)], float(p)) for p, j in zip(top_p, top_i)]
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            box = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)
            out.append(Instance(mask, top[0].label, int(top_i[0]), top[0].probability, top, float(stab[i]), float(scores[i]), box, area))
            if len(out) >= cfg.max_instances:
                break
        return out
