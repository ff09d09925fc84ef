"""OVSAM as one nn.Module: CLIP trunk -> SAM2CLIP neck -> SAM prompt encoder -> CLIP2SAM head (+ CLIP branch)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from segment_anything.modeling import PromptEncoder
from torch import nn

from .backbone import CLIPTrunk
from .config import OVSAMConfig
from .fusion import EXCLUDED_SCORE, exclusion_mask, fuse_logits
from .head import CLIP2SAMHead, cosine_logits
from .neck import SAM2CLIPNeck
from .roi import boxes_to_rois, mask_occupancy, masks_to_boxes_exclusive
from .transforms import ImageFrame, resize_and_normalize, validate_image


@dataclass
class ImageFeatures:
    """Everything `predict` needs from one image, so clicks never touch the trunk or neck again."""

    embedding: torch.Tensor  # [1, C, g, g] SAM-like image embedding
    pyramid: List[torch.Tensor]  # P2..P5 for the recognition head
    c5: torch.Tensor  # [1, C5, s/32, s/32] for the CLIP branch
    frame: ImageFrame
    clip_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # attention-pool key/value maps of C5
    high_res: Optional[List[torch.Tensor]] = None  # [stride 8, stride 4] maps for the decoder (decoder_high_res)

    @property
    def nbytes(self) -> int:
        tensors = [self.embedding, self.c5, *self.pyramid, *(self.clip_kv or ()), *(self.high_res or ())]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> "ImageFeatures":
        conv = lambda t: t.to(device=device, dtype=dtype or t.dtype)  # noqa: E731
        kv = tuple(conv(t) for t in self.clip_kv) if self.clip_kv is not None else None
        high_res = [conv(t) for t in self.high_res] if self.high_res is not None else None
        return ImageFeatures(conv(self.embedding), [conv(p) for p in self.pyramid], conv(self.c5), self.frame, kv, high_res)


@dataclass
class Recognition:
    scores: torch.Tensor  # [N, K+1] fused log-scores (or head log-probabilities without the CLIP branch)
    head_logits: torch.Tensor  # [N, K+1]
    clip_logits: Optional[torch.Tensor]  # [N, K+1]
    rois: torch.Tensor  # [N, 5] head RoIs in input pixels


class OVSAM(nn.Module):
    """The whole model. Trunk, neck and prompt encoder are frozen; the head (CLIP2SAM) is what fine-tuning trains."""

    def __init__(self, cfg: OVSAMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = CLIPTrunk(cfg)
        self.neck = SAM2CLIPNeck(cfg)
        g = cfg.embedding_size
        self.prompt_encoder = PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(g, g),
            input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=16,
        )
        self.head = CLIP2SAMHead(cfg)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std), persistent=False)
        self.freeze_frozen_parts()

    # ---- training helpers -------------------------------------------------------------------
    def freeze_frozen_parts(self) -> None:
        """CLIP trunk, SAM2CLIP neck and prompt encoder never train in CLIP2SAM."""
        for module in (self.trunk, self.neck, self.prompt_encoder):
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> "OVSAM":
        super().train(mode)
        # The trunk's BatchNorm keeps its running statistics; frozen parts stay in eval mode.
        for module in (self.trunk, self.neck, self.prompt_encoder):
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()
        return self

    def set_image_size(self, image_size: int) -> None:
        """Run the model at another input side (a multiple of 32). Small objects get more pixels at a larger
        side; the trunk is convolutional, the neck's position embeddings are resampled, and the prompt encoder
        draws its grid for the new side. Features change scale, so the head should be trained after."""
        cfg = self.cfg.replace(image_size=int(image_size))  # validates the side
        if cfg.image_size == self.cfg.image_size:
            return
        self.neck.resize_grid(cfg.embedding_size)
        g = cfg.embedding_size
        self.prompt_encoder.image_embedding_size = (g, g)
        self.prompt_encoder.input_image_size = (cfg.image_size, cfg.image_size)
        self.prompt_encoder.mask_input_size = (4 * g, 4 * g)
        self.cfg = cfg

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ---- image side -------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> Tuple[torch.Tensor, ImageFrame]:
        image = validate_image(image)
        frame = ImageFrame.for_image(image.shape[0], image.shape[1], self.cfg.image_size)
        x = resize_and_normalize(image, frame, self.pixel_mean, self.pixel_std)
        return x.to(self.device), frame

    def encode_batch(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        """[B, 3, S, S] normalised input -> (embedding [B,C,g,g], pyramid P2..P5, trunk C2..C5)."""
        feats = self.trunk(x)
        embedding = self.neck(feats)
        pyramid = self.head.pyramid(feats)
        return embedding, pyramid, feats

    def encode_image(self, image: np.ndarray) -> ImageFeatures:
        x, frame = self.preprocess(image)
        return self.features_from_outputs(self.encode_outputs(x), frame)

    def encode_images(self, images: Sequence[np.ndarray]) -> List[ImageFeatures]:
        """Several images through the encoder in one batch (a GPU's throughput for pre-annotation); each image's
        features are its own tensors (cloned out of the batch), so caching one keeps only its bytes."""
        inputs = [self.preprocess(image) for image in images]
        outputs = self.encode_outputs(torch.cat([x for x, _ in inputs]))
        return [self.features_from_outputs([o[i:i + 1].clone() for o in outputs], frame)
                for i, (_, frame) in enumerate(inputs)]

    def encode_outputs(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Every per-image tensor as one flat list (`encode_output_names`): what an exported encoder returns."""
        embedding, pyramid, feats = self.encode_batch(x)
        out = [embedding, *pyramid, feats[3]]
        if self.cfg.use_clip_branch:
            out += list(self.trunk.key_value_maps(feats[3]))
        out += list(self.head.high_res_features(feats) or ())
        return out

    def encode_output_names(self) -> List[str]:
        names = ["embedding", "p2", "p3", "p4", "p5", "c5"]
        names += ["clip_k", "clip_v"] if self.cfg.use_clip_branch else []
        names += ["high_res_s8", "high_res_s4"] if self.head.reads_high_res else []
        return names

    def features_from_outputs(self, outputs: List[torch.Tensor], frame: ImageFrame) -> ImageFeatures:
        """`ImageFeatures` from the list of `encode_outputs` (eager or exported)."""
        embedding, pyramid, c5, rest = outputs[0], list(outputs[1:5]), outputs[5], list(outputs[6:])
        kv = (rest.pop(0), rest.pop(0)) if self.cfg.use_clip_branch else None
        return ImageFeatures(embedding, pyramid, c5, frame, kv, rest or None)

    # ---- prompt side ------------------------------------------------------------------------
    def encode_prompts(
        self,
        points: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """SAM's prompt encoding: points [N,P,2] (labels 1/0, -1 = padding) and/or boxes [N,4], input pixels."""
        pts = (points, point_labels) if points is not None else None
        return self.prompt_encoder(points=pts, boxes=boxes, masks=mask_input)

    def image_pe(self) -> torch.Tensor:
        return self.prompt_encoder.get_dense_pe()

    def decode(
        self,
        embedding: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        image_index: Optional[torch.Tensor] = None,
        high_res: Optional[List[torch.Tensor]] = None,
    ) -> torch.Tensor:
        return self.head.decode_masks(embedding, self.image_pe(), sparse, dense, image_index, high_res)

    # ---- recognition ------------------------------------------------------------------------
    def mask_boxes(self, low_res: torch.Tensor) -> torch.Tensor:
        """Boxes of the predicted masks in input pixels (the head's RoIs at inference)."""
        stride = self.cfg.image_size / low_res.shape[-1]
        return masks_to_boxes_exclusive(low_res[:, 0] > 0) * stride

    def head_rois(self, low_res: torch.Tensor, head_boxes: Optional[torch.Tensor] = None,
                  image_index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The head's RoIs of predicted masks (their boxes unless given) and, with mask pooling, the masks' occupancy."""
        if head_boxes is None:
            head_boxes = self.mask_boxes(low_res)
        rois = boxes_to_rois(head_boxes.float(), image_index if image_index is not None else 0)
        weights = None
        if self.cfg.head_mask_pooling:
            weights = mask_occupancy(low_res[:, 0] > 0, rois, self.head.roi_size, low_res.shape[-1] / self.cfg.image_size)
        return rois, weights

    def served_roi_embeddings(self, pyramid: List[torch.Tensor], low_res: torch.Tensor,
                              image_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[N, D] head embeddings of predicted masks, exactly as `recognise` sees them before the cosine."""
        rois, weights = self.head_rois(low_res, None, image_index)
        return self.head.roi_embeddings(pyramid, rois, weights)

    def recognise(
        self,
        pyramid: List[torch.Tensor],
        c5: torch.Tensor,
        low_res: torch.Tensor,
        text_embeddings: torch.Tensor,
        is_base: torch.Tensor,
        head_boxes: Optional[torch.Tensor] = None,
        clip_boxes: Optional[torch.Tensor] = None,
        image_index: Optional[torch.Tensor] = None,
        clip_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        excluded: Optional[torch.Tensor] = None,
    ) -> Recognition:
        """Classify each mask against the vocabulary; boxes default to the predicted masks' boxes.

        excluded: [K] bool, classes scored -1000 after the fusion (the reference's COCO classes in neither split:
        they stay in the softmax normaliser, unlike dropping them from the vocabulary).
        """
        rois, weights = self.head_rois(low_res, head_boxes, image_index)
        head_logits = self.head.classify(pyramid, rois, text_embeddings, weights)
        if not self.cfg.use_clip_branch:
            scores = F.log_softmax(head_logits, dim=-1)
            if excluded is not None:
                scores = scores.masked_fill(exclusion_mask(excluded), EXCLUDED_SCORE)
            return Recognition(scores, head_logits, None, rois)
        clip_rois = rois if clip_boxes is None else boxes_to_rois(clip_boxes.float(), rois[:, 0])  # same images
        clip_logits = self.clip_branch_logits(c5, clip_rois, text_embeddings, clip_kv)
        g = c5.shape[-1]
        valid = (F.interpolate(low_res.float(), (g, g), mode="bilinear", align_corners=False) > 0).flatten(1).any(1)
        scores = fuse_logits(head_logits, clip_logits, is_base, valid, self.cfg.alpha, self.cfg.beta, excluded)
        return Recognition(scores, head_logits, clip_logits, rois)

    def clip_branch_logits(
        self,
        c5: torch.Tensor,
        rois: torch.Tensor,
        text_embeddings: torch.Tensor,
        clip_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """RoIAlign on C5 then CLIP's attention pool: the frozen CLIP's own opinion.

        With the per-image key/value maps (`ImageFeatures.clip_kv`) the same numbers cost a click far less.
        """
        size = self.cfg.clip_roi_size

        def pool(t: torch.Tensor) -> torch.Tensor:
            return roi_align(t, rois.to(t.dtype), size, spatial_scale=1.0 / 32, sampling_ratio=0, aligned=True)

        if clip_kv is None:
            feats = self.trunk.attention_pool(pool(c5))
        else:
            feats = self.trunk.attention_pool_from_maps(pool(c5), pool(clip_kv[0]), pool(clip_kv[1]))
        return cosine_logits(feats, text_embeddings, self.cfg.logit_scale)
