"""Shapes at every stage of the tiny OVSAM model, and mask post-processing back to the original image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ovsam
from ovsam.model import OVSAM
from ovsam.transforms import ImageFrame, upscale_mask_logits


K = 5


@pytest.fixture(scope="module")
def cfg():
    return ovsam.get_config("tiny")


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return OVSAM(cfg).eval()


@pytest.fixture(scope="module")
def text_embeddings(cfg):
    g = torch.Generator().manual_seed(1)
    return F.normalize(torch.randn(K, 2, cfg.clip_embed_dim, generator=g), dim=-1)


def _image(h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def test_rn50x16_preset_shapes():
    cfg = ovsam.get_config("rn50x16")
    assert cfg.trunk_channels == (384, 768, 1536, 3072)
    assert cfg.embedding_size == 64
    assert cfg.low_res_size == 256
    assert cfg.clip_roi_size == 12
    assert cfg.finest_scale == 56.0
    assert cfg.prompt_embed_dim == 256


def test_config_round_trip(cfg):
    assert ovsam.OVSAMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        ovsam.get_config("nope")


def test_trunk_levels_channels_and_strides(model, cfg):
    s = cfg.image_size
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        feats = model.trunk(x)
    assert len(feats) == 4
    for f, ch, stride in zip(feats, cfg.trunk_channels, (4, 8, 16, 32)):
        assert tuple(f.shape) == (2, ch, s // stride, s // stride)
    assert cfg.trunk_channels == (4 * cfg.clip_width, 8 * cfg.clip_width, 16 * cfg.clip_width, 32 * cfg.clip_width)


def test_encode_batch_embedding_and_pyramid(model, cfg):
    s = cfg.image_size
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        embedding, pyramid, feats = model.encode_batch(x)
    g = cfg.embedding_size
    assert tuple(embedding.shape) == (2, cfg.prompt_embed_dim, g, g)
    assert g == s // 16
    assert [tuple(p.shape) for p in pyramid] == [
        (2, cfg.fpn_channels, s // st, s // st) for st in (4, 8, 16, 32)
    ]
    # Batch items are independent (frozen trunk in eval mode: BatchNorm uses running stats).
    with torch.no_grad():
        single, _, _ = model.encode_batch(x[1:])
    torch.testing.assert_close(single[0], embedding[1], rtol=1e-4, atol=1e-5)


def test_encode_image_non_square(model, cfg):
    with torch.no_grad():
        f = model.encode_image(_image(50, 80))
    assert f.frame.original_size == (50, 80)
    assert f.frame.resized_size == (80, 128)
    assert tuple(f.embedding.shape) == (1, cfg.prompt_embed_dim, 8, 8)
    assert tuple(f.c5.shape) == (1, cfg.trunk_channels[3], 4, 4)
    assert f.nbytes == sum(t.numel() * 4 for t in [f.embedding, f.c5, *f.pyramid, *f.clip_kv])


def test_preprocess_pads_with_zero_after_normalising(model, cfg):
    x, frame = model.preprocess(_image(50, 80))
    assert tuple(x.shape) == (1, 3, 128, 128)
    h, w = frame.resized_size
    assert torch.count_nonzero(x[..., h:, :]) == 0
    assert torch.count_nonzero(x[..., :, w:]) == 0
    # SAM/ImageNet statistics: a black pixel becomes -mean/std.
    xb, _ = model.preprocess(np.zeros((16, 16, 3), np.uint8))
    expected = -torch.tensor(cfg.pixel_mean) / torch.tensor(cfg.pixel_std)
    torch.testing.assert_close(xb[0, :, 0, 0], expected)


def test_prompt_encoder_point(model, cfg):
    pts = torch.tensor([[[10.0, 20.0]], [[100.0, 3.0]], [[0.0, 127.0]]])
    labels = torch.ones(3, 1, dtype=torch.long)
    with torch.no_grad():
        sparse, dense = model.encode_prompts(pts, labels)
    c, g = cfg.prompt_embed_dim, cfg.embedding_size
    assert tuple(sparse.shape) == (3, 2, c)  # point + not-a-point padding
    assert tuple(dense.shape) == (3, c, g, g)
    pe = model.prompt_encoder
    with torch.no_grad():
        expected0 = pe.pe_layer.forward_with_coords(pts + 0.5, (cfg.image_size, cfg.image_size))[:, 0]
    torch.testing.assert_close(sparse[:, 0], expected0 + pe.point_embeddings[1].weight)
    torch.testing.assert_close(sparse[:, 1], pe.not_a_point_embed.weight.expand(3, -1))
    torch.testing.assert_close(dense, pe.no_mask_embed.weight.view(1, c, 1, 1).expand(3, c, g, g))


def test_prompt_encoder_box(model, cfg):
    boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [0.0, 0.0, 128.0, 128.0]])
    with torch.no_grad():
        sparse, dense = model.encode_prompts(boxes=boxes)
    assert tuple(sparse.shape) == (2, 2, cfg.prompt_embed_dim)  # two corners, no padding
    pe = model.prompt_encoder
    with torch.no_grad():
        corners = pe.pe_layer.forward_with_coords(boxes.view(2, 2, 2) + 0.5, (cfg.image_size, cfg.image_size))
    torch.testing.assert_close(sparse[:, 0], corners[:, 0] + pe.point_embeddings[2].weight)
    torch.testing.assert_close(sparse[:, 1], corners[:, 1] + pe.point_embeddings[3].weight)


def test_decoder_and_recognition_shapes(model, cfg, text_embeddings):
    with torch.no_grad():
        f = model.encode_image(_image(60, 90))
        pts = torch.tensor([[[30.0, 40.0]], [[80.0, 20.0]], [[5.0, 5.0]]])
        sparse, dense = model.encode_prompts(pts, torch.ones(3, 1, dtype=torch.long))
        low_res = model.decode(f.embedding, sparse, dense)
        assert tuple(low_res.shape) == (3, 1, cfg.image_size // 4, cfg.image_size // 4)
        is_base = torch.tensor([True, True, False, False, True])
        rec = model.recognise(f.pyramid, f.c5, low_res, text_embeddings, is_base)
    assert tuple(rec.scores.shape) == (3, K + 1)
    assert tuple(rec.head_logits.shape) == (3, K + 1)
    assert tuple(rec.clip_logits.shape) == (3, K + 1)
    assert tuple(rec.rois.shape) == (3, 5)
    assert torch.isfinite(rec.scores).all()
    # Background logit of both classifiers is exactly 0 (zero background embedding).
    assert torch.all(rec.head_logits[:, -1] == 0)
    assert torch.all(rec.clip_logits[:, -1] == 0)
    # Different prompts give different masks.
    assert not torch.allclose(low_res[0], low_res[1])


def test_decode_image_index_selects_embedding(model, cfg):
    s = cfg.image_size
    torch.manual_seed(3)
    with torch.no_grad():
        emb, _, _ = model.encode_batch(torch.randn(2, 3, s, s))
        sparse, dense = model.encode_prompts(boxes=torch.tensor([[10.0, 10.0, 90.0, 70.0]] * 2))
        both = model.decode(emb, sparse, dense, image_index=torch.tensor([1, 0]))
        only1 = model.decode(emb[1:], sparse[:1], dense[:1])
        only0 = model.decode(emb[:1], sparse[:1], dense[:1])
    torch.testing.assert_close(both[0], only1[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[1], only0[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(only0, only1)


def test_recognise_head_only_is_head_log_softmax(cfg, text_embeddings):
    torch.manual_seed(0)
    m = OVSAM(cfg.replace(use_clip_branch=False)).eval()
    with torch.no_grad():
        f = m.encode_image(_image(64, 64))
        sparse, dense = m.encode_prompts(boxes=torch.tensor([[10.0, 10.0, 90.0, 70.0]]))
        low_res = m.decode(f.embedding, sparse, dense)
        rec = m.recognise(f.pyramid, f.c5, low_res, text_embeddings, torch.ones(K, dtype=torch.bool))
    assert rec.clip_logits is None
    torch.testing.assert_close(rec.scores, F.log_softmax(rec.head_logits, dim=-1))


def test_mask_boxes_in_input_pixels(model, cfg):
    low = torch.full((2, 1, 32, 32), -5.0)
    low[0, 0, 2:5, 3:9] = 5.0  # rows 2..4, cols 3..8 on the stride-4 grid
    boxes = model.mask_boxes(low)
    torch.testing.assert_close(boxes[0], torch.tensor([12.0, 8.0, 36.0, 20.0]))
    torch.testing.assert_close(boxes[1], torch.zeros(4))


def test_frozen_parts(model):
    for part in (model.trunk, model.neck, model.prompt_encoder):
        assert not any(p.requires_grad for p in part.parameters())
    assert any(p.requires_grad for p in model.head.parameters())
    model.train()
    try:
        assert not model.trunk.training and not model.neck.training and model.head.training
    finally:
        model.eval()


# ---- mask post-processing -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [(50, 80), (80, 50), (37, 91), (1, 300), (300, 1), (1, 1), (3, 1000), (127, 1), (129, 130)])
def test_frame_and_upscale_to_original_size(size):
    h0, w0 = size
    frame = ImageFrame.for_image(h0, w0, 128)
    rh, rw = frame.resized_size
    assert max(rh, rw) == 128
    assert rh >= 1 and rw >= 1, f"resized size {frame.resized_size} for a {h0}x{w0} image"
    low = torch.randn(3, 1, 32, 32)
    out = upscale_mask_logits(low, frame)
    assert tuple(out.shape) == (3, h0, w0)
    assert torch.isfinite(out).all()


def test_upscale_maps_regions_back_to_original_pixels():
    # 50x80 image -> resized 80x128 in the 128 input; low-res 32x32 covers the whole 128 square.
    frame = ImageFrame.for_image(50, 80, 128)
    low = torch.full((1, 1, 32, 32), -10.0)
    low[..., :, :16] = 10.0  # left half of the input = x < 64 input px = x < 40 original px
    mask = upscale_mask_logits(low, frame)[0] > 0
    assert mask.shape == (50, 80)
    assert mask[:, :39].all()
    assert not mask[:, 41:].any()
    # The padding below the resized image must not leak in: positive only where y >= 80 input px.
    low2 = torch.full((1, 1, 32, 32), -10.0)
    low2[..., 20:, :] = 10.0  # rows >= 80 input px are padding
    assert not (upscale_mask_logits(low2, frame)[0] > 0).any()


def test_upscale_matches_spec_recipe():
    frame = ImageFrame.for_image(37, 91, 128)
    low = torch.randn(2, 1, 32, 32)
    x = F.interpolate(low, (128, 128), mode="bilinear", align_corners=False)
    h, w = frame.resized_size
    x = F.interpolate(x[..., :h, :w], (37, 91), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(upscale_mask_logits(low, frame), x)


@pytest.mark.parametrize("size", [(1, 300), (300, 1), (37, 91)])
def test_encode_image_thin_images(model, cfg, size):
    with torch.no_grad():
        f = model.encode_image(_image(*size))
    assert f.frame.original_size == size
    assert tuple(f.embedding.shape) == (1, cfg.prompt_embed_dim, 8, 8)
    assert torch.isfinite(f.embedding).all()


def test_frame_coordinate_scaling():
    frame = ImageFrame.for_image(37, 91, 128)
    rh, rw = frame.resized_size
    assert (rh, rw) == (52, 128)
    pts = frame.points_to_input(np.array([[10.0, 20.0], [91.0, 37.0]]))
    torch.testing.assert_close(pts, torch.tensor([[10 * rw / 91, 20 * rh / 37], [128.0, 52.0]]))
    box = frame.boxes_to_input(np.array([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(box, torch.tensor([1 * rw / 91, 2 * rh / 37, 3 * rw / 91, 4 * rh / 37]))
    torch.testing.assert_close(frame.boxes_to_original(box[None]), torch.tensor([[1.0, 2.0, 3.0, 4.0]]))


@pytest.mark.parametrize("mask_pooling", [True, False])
def test_mask_pooling_reads_only_the_mask(cfg, text_embeddings, mask_pooling):
    """Features inside the mask's box but off the mask move the label only without `head_mask_pooling`."""
    torch.manual_seed(0)
    m = OVSAM(cfg.replace(use_clip_branch=False, head_mask_pooling=mask_pooling)).eval()
    low = torch.full((1, 1, cfg.image_size // 4, cfg.image_size // 4), -5.0)
    low[0, 0, 4:12, 4:6] = 5.0  # an L: a bar down the left of the box [16, 16, 48, 48] ...
    low[0, 0, 10:12, 4:12] = 5.0  # ... and along its bottom; the box's top right is off the mask
    with torch.no_grad():
        f = m.encode_image(_image(128, 128))
        rec = m.recognise(f.pyramid, f.c5, low, text_embeddings, torch.ones(K, dtype=torch.bool))
        moved = []
        for level, stride in zip(f.pyramid, (4, 8, 16, 32)):
            level = level.clone()
            level[..., : 32 // stride, 32 // stride :] += 10 * torch.randn_like(level[..., : 32 // stride, 32 // stride :])
            moved.append(level)
        rec_moved = m.recognise(moved, f.c5, low, text_embeddings, torch.ones(K, dtype=torch.bool))
    torch.testing.assert_close(rec.rois[0, 1:], torch.tensor([16.0, 16.0, 48.0, 48.0]))
    assert torch.allclose(rec.head_logits, rec_moved.head_logits, atol=1e-5) == mask_pooling


# ---------------------------------------------------------------------------- decoder_high_res


def _click(m, f):
    sparse, dense = m.encode_prompts(points=torch.tensor([[[40.0, 30.0]]]), point_labels=torch.ones(1, 1, dtype=torch.long))
    return m.decode(f.embedding, sparse, dense, high_res=f.high_res)


def test_high_res_projections_start_at_zero_and_then_change_the_masks(cfg):
    """Added to a trained decoder they draw its masks exactly; once trained, the trunk's fine maps matter."""
    torch.manual_seed(0)
    m = OVSAM(cfg).eval()
    image = _image(64, 80)
    with torch.no_grad():
        plain = _click(m, m.encode_image(image))
        m.cfg = cfg.replace(decoder_high_res=True)
        m.head.add_high_res_projections(m.cfg)
        f = m.encode_image(image)
        s, g = cfg.image_size, cfg.prompt_embed_dim
        assert [tuple(t.shape) for t in f.high_res] == [(1, g // 4, s // 8, s // 8), (1, g // 8, s // 4, s // 4)]
        torch.testing.assert_close(_click(m, f), plain, rtol=0, atol=0)
        for conv in m.head.mask_decoder.high_res_proj:
            torch.nn.init.normal_(conv.weight, std=0.5)
        f = m.encode_image(image)
        assert not torch.allclose(_click(m, f), plain, atol=1e-3)
        assert f.nbytes == sum(t.numel() * 4 for t in (f.embedding, f.c5, *f.pyramid, *f.clip_kv, *f.high_res))
        with pytest.raises(ValueError, match="high_res"):
            sparse, dense = m.encode_prompts(boxes=torch.tensor([[10.0, 10.0, 90.0, 70.0]]))
            m.decode(f.embedding, sparse, dense)


def test_high_res_decode_follows_image_index(cfg):
    torch.manual_seed(4)
    m = OVSAM(cfg.replace(decoder_high_res=True)).eval()
    for conv in m.head.mask_decoder.high_res_proj:
        torch.nn.init.normal_(conv.weight, std=0.5)
    s = cfg.image_size
    with torch.no_grad():
        emb, _, feats = m.encode_batch(torch.randn(2, 3, s, s))
        hr = m.head.high_res_features(feats)
        sparse, dense = m.encode_prompts(boxes=torch.tensor([[10.0, 10.0, 90.0, 70.0]] * 2))
        both = m.decode(emb, sparse, dense, image_index=torch.tensor([1, 0]), high_res=hr)
        only1 = m.decode(emb[1:], sparse[:1], dense[:1], high_res=[t[1:] for t in hr])
        only0 = m.decode(emb[:1], sparse[:1], dense[:1], high_res=[t[:1] for t in hr])
    torch.testing.assert_close(both[0], only1[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[1], only0[0], rtol=1e-4, atol=1e-5)
    assert m.head.high_res_features(feats) is not None and OVSAM(cfg).head.high_res_features(feats) is None


def test_set_image_size_matches_a_fresh_model_of_that_side_and_keeps_the_weights_meaning(cfg):
    """A model moved to another input side has a fresh model's shapes (its artifact loads strictly), and its
    resampled relative positions give what SAM's attention computes when it interpolates them itself."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    torch.manual_seed(3)
    model = OVSAM(cfg).eval()
    for block in model.neck.blocks:  # zero-initialised in a fresh model: give them content to resample
        torch.nn.init.normal_(block.attn.rel_pos_h)
        torch.nn.init.normal_(block.attn.rel_pos_w)
    global_blocks = [b for b in model.neck.blocks if not b.window_size]
    assert global_blocks
    old_rel = global_blocks[0].attn.rel_pos_h.detach().clone()
    side = cfg.image_size + 32
    model.set_image_size(side)
    assert model.cfg.image_size == side and model.cfg.embedding_size == side // 16
    fresh = OVSAM(cfg.replace(image_size=side))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    fresh.load_state_dict(model.state_dict(), strict=True)
    g = side // 16
    torch.testing.assert_close(get_rel_pos(g, g, global_blocks[0].attn.rel_pos_h), get_rel_pos(g, g, old_rel))
    with torch.no_grad():
        feats = model.encode_image(_image(60, 90))
        assert tuple(feats.embedding.shape[-2:]) == (g, g)
        sparse, dense = model.encode_prompts(torch.tensor([[[30.0, 40.0]]]), torch.ones(1, 1, dtype=torch.long))
        low_res = model.decode(feats.embedding, sparse, dense, high_res=feats.high_res)
    assert tuple(dense.shape[-2:]) == (g, g)
    assert tuple(low_res.shape[-2:]) == (side // 4, side // 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        model.set_image_size(side + 16)
