"""The official-size (RN50x16) neck, prompt encoder and head on real tensors of the official shapes.

Weights are random: this checks the data flow, not numbers. The full 5-block neck takes ~45 s on two CPU
cores, so it is marked slow; the fast tests cover every other official-size module.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, List

import pytest
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d
from segment_anything.modeling import PromptEncoder
from torch import nn
from torchvision.ops import roi_align

from ovsam import get_config
from ovsam.head import CLIP2SAMHead, cosine_logits
from ovsam.neck import SAM2CLIPNeck
from ovsam.roi import boxes_to_rois, masks_to_boxes_exclusive

CFG = get_config("rn50x16")


@pytest.fixture(scope="module")
def official():
    torch.manual_seed(0)
    neck = SAM2CLIPNeck(CFG).eval()
    head = CLIP2SAMHead(CFG).eval()
    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16)
    feats = [torch.randn(1, c, 1024 // s, 1024 // s) for c, s in zip((384, 768, 1536, 3072), (4, 8, 16, 32))]
    return neck, head, prompt_encoder.eval(), feats


@contextlib.contextmanager
def without_blocks(neck: SAM2CLIPNeck) -> Iterator[None]:
    blocks, neck.blocks = neck.blocks, nn.ModuleList()
    try:
        yield
    finally:
        neck.blocks = blocks


def _decode_and_recognise(head: CLIP2SAMHead, prompt_encoder: PromptEncoder, embedding: torch.Tensor,
                          feats: List[torch.Tensor]) -> None:
    points = torch.tensor([[[300.0, 400.0]], [[700.0, 120.0]]])
    sparse, dense = prompt_encoder(points=(points, torch.ones(2, 1, dtype=torch.long)), boxes=None, masks=None)
    assert sparse.shape == (2, 2, 256) and dense.shape == (2, 256, 64, 64)  # point + padding token
    low_res = head.decode_masks(embedding, prompt_encoder.get_dense_pe(), sparse, dense)
    assert low_res.shape == (2, 1, 256, 256)

    pyramid = head.pyramid(feats)
    assert [tuple(p.shape) for p in pyramid] == [(1, 256, 256, 256), (1, 256, 128, 128), (1, 256, 64, 64), (1, 256, 32, 32)]
    boxes = masks_to_boxes_exclusive(low_res[:, 0] > 0) * 4
    boxes[(boxes[:, 2:] <= boxes[:, :2]).any(1)] = torch.tensor([100.0, 100.0, 400.0, 300.0])  # random weights may give empty masks
    rois = boxes_to_rois(boxes, 0)
    text = F.normalize(torch.randn(5, 2, 768), dim=-1)
    logits = head.classify(pyramid, rois, text)
    assert logits.shape == (2, 6)
    assert torch.equal(logits[:, -1], torch.zeros(2))  # the appended all-zero background class
    assert logits[:, :-1].abs().max() <= math.exp(4.6052) + 1e-3


@torch.inference_mode()
def test_official_neck_projections_to_embedding(official):
    """C2..C5 of RN50x16 at 1024² -> four 64×64×1280 levels -> summed -> output neck [1,256,64,64]."""
    neck, _, _, feats = official
    levels: List[torch.Size] = []
    hooks = [p.register_forward_hook(lambda m, i, out: levels.append(out.shape)) for p in neck.patch_embeds]
    try:
        with without_blocks(neck):
            assert neck(feats).shape == (1, 256, 64, 64)
    finally:
        for h in hooks:
            h.remove()
    assert levels == [(1, 1280, 64, 64)] * 4


@torch.inference_mode()
def test_official_windowed_block_keeps_the_grid(official):
    neck = official[0]
    x = torch.randn(1, 64, 64, 1280)
    assert neck.blocks[0].window_size == 14 and neck.blocks[4].window_size == 0
    assert neck.blocks[0](x).shape == (1, 64, 64, 1280)


@torch.inference_mode()
def test_official_head_decodes_and_recognises(official):
    _, head, prompt_encoder, feats = official
    _decode_and_recognise(head, prompt_encoder, torch.randn(1, 256, 64, 64), feats)


@torch.inference_mode()
def test_official_box_prompt_encoding(official):
    prompt_encoder = official[2]
    sparse, _ = prompt_encoder(points=None, boxes=torch.tensor([[10.0, 20.0, 300.0, 400.0]]), masks=None)
    assert sparse.shape == (1, 2, 256)  # two corners, no padding point


def test_logit_scale_is_exp_4_6052(official):
    head = official[1]
    assert head.logit_scale == pytest.approx(math.exp(4.6052)) and head.logit_scale != 100.0
    text = F.normalize(torch.randn(5, 3, 768), dim=-1)
    logits = cosine_logits(text[2, 1][None], text, head.logit_scale)
    assert logits[0, 2].item() == pytest.approx(100.0028, abs=1e-3)
    assert logits[0, -1].item() == 0.0


@torch.inference_mode()
def test_official_clip_branch_attention_pool(official):
    """RoIAlign 12×12 on C5 then RN50x16's attention pool (positional embedding [145, 3072]) -> [N, 768]."""
    c5 = official[3][3]
    pool = AttentionPool2d(12, 3072, 48, 768)
    assert pool.positional_embedding.shape == (145, 3072)
    rois = boxes_to_rois(torch.tensor([[0.0, 0.0, 512.0, 512.0], [100.0, 300.0, 900.0, 1000.0]]), 0)
    pooled = roi_align(c5, rois, 12, spatial_scale=1 / 32, sampling_ratio=0, aligned=True)
    assert pooled.shape == (2, 3072, 12, 12)
    assert pool(pooled).shape == (2, 768)


@pytest.mark.slow
@torch.inference_mode()
def test_official_neck_and_head_end_to_end(official):
    """The whole official SAM2CLIP neck (5 ViT blocks, last one global) then the head, as in §1.1."""
    neck, head, prompt_encoder, feats = official
    embedding = neck(feats)
    assert embedding.shape == (1, 256, 64, 64) and torch.isfinite(embedding).all()
    _decode_and_recognise(head, prompt_encoder, embedding, feats)
