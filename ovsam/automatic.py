"""Automatic mode: segment and recognise everything from a grid of point prompts.

SAM's recipe (grid of points → masks → quality filter → NMS → minimum area) with three changes, each for a failure
seen in pre-annotation (issue 22):

- The head has no IoU output, so a mask is kept on its stability score, its recognition confidence and its
  *support*: how many grid prompts produced (nearly) the same mask, relative to how many grid points fall inside
  it. A real object pulls the prompts on it to one outline; a stretch of background gives a different blob for
  each prompt (on the synthetic data, support alone tells background regions from objects with AUC 0.998, stability
  0.97, class confidence 0.80 — the recogniser names background confidently).
- Duplicates are removed on the masks themselves (mask IoU on RLE, at the model's input resolution), not on boxes:
  one stray pixel far from the object makes a box useless for comparing two copies of the same mask.
- A mask lying mostly inside a kept mask of the same label is a part of it and is dropped; an object split into
  several kept parts is replaced by the mask covering them. A small object of *another* label inside a big one is
  a nested object and stays, and so do touching objects. Slivers along the image border are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything.utils.amg import build_point_grid, calculate_stability_score, remove_small_regions

from .boxes import mask_to_box
from .fusion import foreground_probabilities
from .model import ImageFeatures
from .predictor import LabelScore, OVSAMPredictor
from .transforms import ImageFrame, input_frame_mask_logits, upscale_mask_logits


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
    """Defaults tuned on the synthetic data with the demo model (bench/preannotate.py, bench/README.md)."""

    points_per_side: int = 16
    points_per_batch: int = 64
    stability_threshold: float = 0.7
    stability_offset: float = 1.0
    confidence_threshold: float = 0.7
    # Grid prompts whose mask has IoU >= support_iou with a candidate vote for it; a candidate needs
    # votes >= min_support × (grid points inside it, at least 1). 0 turns the vote off.
    min_support: float = 0.6
    support_iou: float = 0.8
    nms_iou: float = 0.5  # mask IoU above which the lower-scoring of two masks is a duplicate (as torchvision.ops.nms)
    part_of_whole: float = 0.8  # share of a mask inside a kept mask of the same label that makes it a part
    edge_sliver: float = 0.03  # a mask touching the border no thicker than this share of the image side is dropped
    min_area_fraction: float = 0.0005  # of the image area; also the size of islands and holes cleaned from masks
    max_instances: int = 100
    top_k: int = 5


@dataclass
class _Candidates:
    """Grid masks that passed the per-mask filters, with everything the later steps need (on the device)."""

    logits: torch.Tensor  # [K, 1, l, l] low-res logits
    probs: torch.Tensor  # [K, C] foreground class probabilities
    stability: torch.Tensor  # [K]
    support: torch.Tensor  # [K] votes / expected votes

    @property
    def scores(self) -> torch.Tensor:
        return self.stability * self.probs.max(dim=-1).values


def low_res_extent(frame: ImageFrame, side: int) -> Tuple[int, int]:
    """Rows and columns of a low-res mask that cover the image (the rest is padding)."""
    h, w = frame.resized_size
    return max(1, round(h * side / frame.input_size)), max(1, round(w * side / frame.input_size))


def prompt_support(candidates: torch.Tensor, grid_masks: torch.Tensor, iou: float) -> torch.Tensor:
    """Votes for each candidate [K, h, w] from all grid prompts' masks [N, h, w], over the votes expected.

    A prompt votes for a candidate when its mask has IoU >= `iou` with it; a candidate covering a share s of the
    image expects s × N prompts inside it (at least one), so an object whose prompts all agree scores about 1.
    """
    c = candidates.flatten(1).float()
    g = grid_masks.flatten(1).float()
    inter = c @ g.T
    union = c.sum(1, keepdim=True) + g.sum(1)[None] - inter
    votes = (inter >= iou * union.clamp(min=1)).sum(1).float()
    expected = (c.sum(1) * len(g) / c.shape[1]).clamp(min=1.0)
    return votes / expected


def encode_rle(masks: np.ndarray) -> list:
    """[N, H, W] bool → COCO RLEs (pycocotools wants Fortran order)."""
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def remove_duplicates(rles: Sequence[dict], scores: Sequence[float], labels: Sequence[int],
                      nms_iou: float, part_of_whole: float) -> List[int]:
    """Indices of the masks to keep, best score first: one mask per object.

    Visiting masks from the best score down, a mask is dropped when its IoU with a kept one exceeds `nms_iou`
    (the same object again, whatever the label), or when it has the label of a kept mask and lies mostly inside it
    (share of its area >= `part_of_whole`: a part of that object). Two or more kept masks that turn out to lie mostly
    inside a later mask of their label are parts of one object split up: that mask replaces them, whatever their IoU
    with it (the whole wins over its parts). One kept mask inside a later one is not: the later one is the same
    object with a looser outline (or the object with a bit of its neighbour) and is dropped. Masks of other labels inside a kept one (nested
    objects) and touching masks (IoU ~0) are kept.
    """
    n = len(rles)
    if n == 0:
        return []
    rles = list(rles)
    iou = np.asarray(mask_utils.iou(rles, rles, [0] * n), dtype=np.float64).reshape(n, n)
    area = np.array([mask_utils.area(r) for r in rles], dtype=np.float64)  # area() of a list overflows past 255
    inter = iou * (area[:, None] + area[None, :]) / (1.0 + iou)  # |a ∩ b| from IoU and the two areas
    inside = inter / np.maximum(area[:, None], 1.0)  # [i, j]: share of mask i inside mask j
    same = np.asarray(labels)[:, None] == np.asarray(labels)[None, :]
    by_score = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable").tolist()
    kept: List[int] = []
    for i in by_score:
        if any(same[i, k] and inside[i, k] >= part_of_whole for k in kept):
            continue  # a part of a kept object
        parts = [k for k in kept if same[i, k] and inside[k, i] >= part_of_whole]
        if len(parts) == 1:
            continue  # one kept mask inside this one: the same object, this a looser outline of it
        if any(iou[i, k] > nms_iou for k in kept if k not in parts):
            continue  # the same object again
        kept = [k for k in kept if k not in parts] + [i]
    rank = {k: r for r, k in enumerate(by_score)}
    return sorted(kept, key=rank.__getitem__)


def is_edge_sliver(mask: np.ndarray, thickness: float) -> bool:
    """Whether a mask touches a border and reaches no further than `thickness` × the image side away from it."""
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return False
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return bool(
        (top == 0 and bottom <= thickness * h) or (bottom == h and top >= h - thickness * h)
        or (left == 0 and right <= thickness * w) or (right == w and left >= w - thickness * w)
    )


def clean_mask(mask: np.ndarray, min_area: float) -> np.ndarray:
    """Without islands and holes smaller than `min_area` pixels (SAM's postprocessing)."""
    if min_area <= 0:
        return mask
    mask, _ = remove_small_regions(mask, min_area, mode="holes")
    mask, _ = remove_small_regions(mask, min_area, mode="islands")
    return mask


class AutomaticMaskGenerator:
    """Runs the predictor's decoder and recogniser over a point grid and keeps one good mask per object."""

    def __init__(self, predictor: OVSAMPredictor, config: Optional[AutomaticConfig] = None) -> None:
        self.predictor = predictor
        self.config = config or AutomaticConfig()

    def generate(self, features: ImageFeatures) -> List[Instance]:
        candidates = self._grid_candidates(features)
        if candidates is None:
            return []
        return self._select(candidates, features.frame)

    def _grid_candidates(self, features: ImageFeatures) -> Optional[_Candidates]:
        """Every grid prompt through decoder and recogniser; those stable and confident enough, with their support."""
        cfg, pred = self.config, self.predictor
        model, vocab, dev = pred.model, pred.vocabulary, pred.device
        frame = features.frame
        h, w = frame.resized_size
        # Grid over the resized image region only (never over the padding), in input pixels.
        grid = torch.as_tensor(build_point_grid(cfg.points_per_side), dtype=torch.float32) * torch.tensor([w, h])
        kept_logits, kept_probs, kept_stab, grid_masks = [], [], [], []
        # The device lock is taken per batch of points, so a click waiting for the device gets it between batches.
        for start in range(0, len(grid), cfg.points_per_batch):
            with pred.inference():
                pts = grid[start : start + cfg.points_per_batch].to(dev)[:, None, :]
                labels = torch.ones(pts.shape[:2], dtype=torch.long, device=dev)
                sparse, dense = model.encode_prompts(pts, labels)
                low_res = model.decode(features.embedding, sparse, dense, high_res=features.high_res).float()
                lh, lw = low_res_extent(frame, low_res.shape[-1])
                grid_masks.append(low_res[:, 0, :lh, :lw] > 0)
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
                    kept_probs.append(probs[keep])
                    kept_stab.append(stability[keep])
        if not kept_logits:
            return None
        logits = torch.cat(kept_logits)
        lh, lw = low_res_extent(frame, logits.shape[-1])
        support = prompt_support(logits[:, 0, :lh, :lw] > 0, torch.cat(grid_masks), cfg.support_iou)
        return _Candidates(logits, torch.cat(kept_probs), torch.cat(kept_stab), support)

    def _select(self, cands: _Candidates, frame: ImageFrame) -> List[Instance]:
        """Support, area and edge filters on masks at the input resolution, duplicates out, the rest upscaled."""
        cfg = self.config
        ok = cands.support >= cfg.min_support
        order = [i for i in torch.argsort(cands.scores, descending=True, stable=True).tolist() if ok[i]]
        if not order:
            return []
        # Masks at the model's input resolution over the image (the frame the decoder draws in): fine enough to
        # compare masks exactly, and never larger than the input however large the original image.
        work = (input_frame_mask_logits(cands.logits[order], frame.input_size, *frame.resized_size)[:, 0] > 0).cpu().numpy()
        min_work_area = cfg.min_area_fraction * work.shape[1] * work.shape[2]
        fits = [j for j in range(len(order))
                if work[j].sum() >= max(min_work_area, 1) and not is_edge_sliver(work[j], cfg.edge_sliver)]
        if not fits:
            return []
        labels = cands.probs.argmax(dim=-1).cpu()
        scores = cands.scores.cpu()
        kept = remove_duplicates(encode_rle(work[fits]), [float(scores[order[j]]) for j in fits],
                                 [int(labels[order[j]]) for j in fits], cfg.nms_iou, cfg.part_of_whole)
        return self._instances([order[fits[j]] for j in kept], cands, frame)

    def _instances(self, indices: List[int], cands: _Candidates, frame: ImageFrame) -> List[Instance]:
        """The kept candidates as instances at the original size, cleaned of islands and holes."""
        cfg, vocab = self.config, self.predictor.vocabulary
        min_area = cfg.min_area_fraction * frame.original_size[0] * frame.original_size[1]
        k = min(cfg.top_k, len(vocab))
        out: List[Instance] = []
        for i in indices:
            mask = clean_mask((upscale_mask_logits(cands.logits[i : i + 1], frame)[0] > 0).cpu().numpy(), min_area)
            area = int(mask.sum())
            if area < max(min_area, 1):
                continue
            top_p, top_i = cands.probs[i].topk(k)
            top = [LabelScore(vocab.labels[int(j)], float(p)) for p, j in zip(top_p, top_i)]
            stab = float(cands.stability[i])
            out.append(Instance(mask, top[0].label, int(top_i[0]), top[0].probability, top, stab,
                                stab * top[0].probability, mask_to_box(mask), area))
            if len(out) >= cfg.max_instances:
                break
        return out
