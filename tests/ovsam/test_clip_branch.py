"""The per-image key/value maps make the CLIP branch cheap per click without changing its numbers."""
import torch
from torchvision.ops import roi_align

from ovsam import OVSAM, get_config
from ovsam.backbone import CLIPTrunk


def _pool(t, rois, size):
    return roi_align(t, rois, size, spatial_scale=1 / 32, sampling_ratio=0, aligned=True)


def test_attention_pool_from_maps_equals_clip_attnpool():
    torch.manual_seed(0)
    cfg = get_config("tiny")
    trunk = CLIPTrunk(cfg).eval()
    g = cfg.image_size // 32
    c5 = torch.randn(1, cfg.trunk_channels[3], g, g)
    rois = torch.tensor([[0, 5.0, 7.0, 60.0, 90.0], [0, 0.0, 0.0, 3.0, 3.0], [0, 0.0, 0.0, 128.0, 128.0]])
    size = cfg.clip_roi_size
    with torch.no_grad():
        reference = trunk.attention_pool(_pool(c5, rois, size))
        k, v = trunk.key_value_maps(c5)
        fast = trunk.attention_pool_from_maps(_pool(c5, rois, size), _pool(k, rois, size), _pool(v, rois, size))
    assert fast.shape == reference.shape == (3, cfg.clip_embed_dim)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


def test_encode_image_carries_maps_and_recognition_matches_the_plain_path():
    torch.manual_seed(1)
    model = OVSAM(get_config("tiny")).eval()
    image = (torch.rand(90, 120, 3) * 255).to(torch.uint8).numpy()
    with torch.no_grad():
        feats = model.encode_image(image)
        assert feats.clip_kv is not None and feats.clip_kv[0].shape == feats.c5.shape
        rois = torch.tensor([[0, 10.0, 10.0, 80.0, 60.0]])
        text = torch.nn.functional.normalize(torch.randn(4, 2, model.cfg.clip_embed_dim), dim=-1)
        plain = model.clip_branch_logits(feats.c5, rois, text)
        fast = model.clip_branch_logits(feats.c5, rois, text, feats.clip_kv)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
