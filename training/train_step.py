"""The trainable CLIP2SAM step: the module DDP wraps, and the losses of its output.

Frozen image features (or, with `train_all`, the trunk and neck in the graph) -> FPN + mask decoder + RoI
classifier. Kept apart from the loop (`training.engine`) so that the benchmark (`bench/train_step.py`) times
exactly the step fine-tuning takes.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ovsam.head import cosine_logits
from ovsam.model import OVSAM
from ovsam.roi import boxes_to_rois, mask_occupancy
from ovsam.transforms import input_frame_mask_logits
from training import losses as L
from training.data.prompts import center_point
from training.distributed import all_reduce_sum
from training.label_fit import SERVED_MIN_IOU
from training.metrics import mask_iou


class CLIP2SAMTrainStep(nn.Module):
    """The trainable forward: FPN + mask decoder + RoI classifier on top of frozen image features.

    DDP wraps this module. Every trainable parameter gets a gradient each step (a zero term touches
    those a batch does not use, e.g. the P5 conv when no RoI is large), so DDP needs no unused-parameter
    search and 1 and N processes make identical updates.
    """

    def __init__(self, model: OVSAM, text_embeddings: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("text_embeddings", text_embeddings.float(), persistent=False)
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self.image_side_trains = any(p.requires_grad for p in (*model.trunk.parameters(), *model.neck.parameters()))
        self.decoder_trains = any(p.requires_grad for p in model.head.mask_decoder.parameters())

    def forward(self, batch: Dict[str, Any], feats: Optional[List[torch.Tensor]] = None,
                embedding: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        m = self.model
        if feats is None:
            # Frozen trunk and neck (the recipe) build no graph; pretraining (`train_all`) trains them too.
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.image_side_trains):
                feats = m.trunk(batch["images"])
                embedding = m.neck(feats)
        logits = cosine_logits(self.roi_embeddings(batch, m.head.pyramid(feats)), self.text_embeddings, m.head.logit_scale)
        image_index = batch["image_index"]
        dec = torch.nonzero(batch["has_mask"], as_tuple=True)[0]  # box-only instances train only the classifier
        if not self.decoder_trains:
            dec = dec[:0]  # no mask loss can change anything: skip decoding
        low_res = embedding.new_zeros(0, 1, m.cfg.low_res_size, m.cfg.low_res_size)
        if dec.numel():
            sparse, dense = self.encode_prompts(batch, dec)
            low_res = m.decode(embedding, sparse, dense, image_index[dec], m.head.high_res_features(feats))
        zero = sum(p.sum() for p in self._trainable) * 0.0
        return {"logits": logits, "low_res": low_res, "decoded": dec, "zero": zero}

    def roi_embeddings(self, batch: Dict[str, Any], pyramid: List[torch.Tensor]) -> torch.Tensor:
        """[N, D] head embeddings of the batch's annotated objects (their GT boxes, and masks when pooled by mask)."""
        m = self.model
        rois = boxes_to_rois(batch["boxes"].float(), batch["image_index"])
        weights = None
        if m.cfg.head_mask_pooling:  # GT masks (in the input frame); box-only instances fall back to the box
            weights = mask_occupancy(batch["masks"], rois, m.head.roi_size, 1.0, batch["mask_index"])
        return m.head.roi_embeddings(pyramid, rois, weights)

    @torch.no_grad()
    def served_embeddings(self, batch: Dict[str, Any], pyramid: List[torch.Tensor], embedding: torch.Tensor,
                          high_res: Optional[List[torch.Tensor]], keep: List[int],
                          min_iou: float = SERVED_MIN_IOU) -> Tuple[torch.Tensor, torch.Tensor]:
        """Head embeddings of what the served model outlines for an annotator's prompts, with their labels.

        For each annotated object (prompt positions `keep`, one per object) with a mask: a click at its centre
        (`center_point`, the evaluation's click) and its box go through the mask decoder, and the head embeds
        the predicted masks as `recognise` does (clicks first, then boxes). An outline whose `mask_iou` with the
        annotation is under `min_iou` is dropped: its embedding shows another object (a click on a cross that
        outlined the ring behind it) under this label.
        """
        m = self.model
        keep_t = torch.as_tensor(keep, dtype=torch.long, device=batch["labels"].device)
        keep_t = keep_t[batch["has_mask"][keep_t]]
        if keep_t.numel() == 0:  # box-only annotations: nothing to click at
            return embedding.new_zeros(0, m.cfg.clip_embed_dim), batch["labels"][:0]
        labels, image_index = batch["labels"][keep_t], batch["image_index"][keep_t]
        gt = batch["masks"][batch["mask_index"][keep_t]].bool().cpu().numpy()
        points = torch.tensor([center_point(g) for g in gt], dtype=torch.float32, device=embedding.device).view(-1, 1, 2)
        prompts = (m.encode_prompts(points=points, point_labels=torch.ones_like(points[..., 0], dtype=torch.long)),
                   m.encode_prompts(boxes=batch["boxes"][keep_t].float()))
        size, h, w = m.cfg.image_size, gt.shape[1], gt.shape[2]
        out, out_labels = [], []
        for sparse, dense in prompts:
            low_res = m.decode(embedding, sparse, dense, image_index, high_res).float()
            pred = (input_frame_mask_logits(low_res, size, h, w)[:, 0] > 0).cpu().numpy()
            good = torch.tensor([mask_iou(g, p) >= min_iou for g, p in zip(gt, pred)], dtype=torch.bool, device=labels.device)
            out.append(m.served_roi_embeddings(pyramid, low_res, image_index)[good])
            out_labels.append(labels[good])
        return torch.cat(out), torch.cat(out_labels)

    def set_text_embeddings(self, embeddings: torch.Tensor) -> None:
        self.text_embeddings.copy_(embeddings.float())

    @torch.no_grad()
    def encode_prompts(self, batch: Dict[str, Any], dec: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Box prompts (GT box) and single positive point prompts, back in the order of `dec`."""
        m = self.model
        is_box = batch["is_box"][dec]
        sparse = dense = None
        for sel, kind in ((is_box, "box"), (~is_box, "point")):
            idx = torch.nonzero(sel, as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            rows = dec[idx]
            if kind == "box":
                s, d = m.encode_prompts(boxes=batch["boxes"][rows].float())
            else:
                pts = batch["points"][rows].float().unsqueeze(1)
                s, d = m.encode_prompts(points=pts, point_labels=torch.ones_like(pts[..., 0], dtype=torch.long))
            if sparse is None:
                sparse = s.new_zeros(len(dec), *s.shape[1:])
                dense = d.new_zeros(len(dec), *d.shape[1:])
            sparse[idx], dense[idx] = s, d
        return sparse, dense


def compute_losses(out: Dict[str, torch.Tensor], batch: Dict[str, Any], cfg: L.LossConfig, image_size: int,
                   world_size: int) -> Dict[str, torch.Tensor]:
    """Weighted CE + BCE + Dice; each divided by the mean count over ranks (= the 1-process mean)."""
    dev = out["logits"].device
    counts = all_reduce_sum(torch.tensor([float(out["logits"].shape[0]), float(out["decoded"].numel())], device=dev))
    n_cls = max(1.0, float(counts[0]) / world_size)
    n_mask = max(1.0, float(counts[1]) / world_size)
    losses = {"cls": cfg.cls_weight * L.classification_loss(out["logits"], batch["labels"], cfg.background_weight, n_cls)}
    low_res = out["low_res"]
    if low_res.shape[0]:
        coords = L.uncertain_point_coords(low_res, batch["masked_counts"], batch["seeds"], cfg.num_points,
                                          cfg.oversample, cfg.importance)
        pred = L.point_sample(low_res.float(), coords)[:, 0]
        target = L.sample_binary_masks(batch["masks"], batch["mask_index"][out["decoded"]], coords, image_size)
        ml = L.mask_losses(pred, target, n_mask)
        losses["mask"] = cfg.mask_weight * ml["mask"]
        losses["dice"] = cfg.dice_weight * ml["dice"]
    else:
        losses["mask"] = losses["dice"] = out["logits"].new_zeros(())
    losses["loss"] = losses["cls"] + losses["mask"] + losses["dice"] + out["zero"]
    return losses


def to_device(batch: Dict[str, Any], dev: torch.device) -> Dict[str, Any]:
    """A collated batch with its tensors on `dev` (the other entries as they are)."""
    return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
