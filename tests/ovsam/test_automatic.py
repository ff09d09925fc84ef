"""Automatic mode with crafted decoder / recogniser outputs: sizes, order, NMS, thresholds."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ovsam
from ovsam.automatic import AutomaticConfig, AutomaticMaskGenerator
from ovsam.model import OVSAM, Recognition
from ovsam.predictor import OVSAMPredictor
from ovsam.vocabulary import Vocabulary


LABELS = ["cat", "dog", "cup"]
H0, W0 = 50, 100  # resized to 64x128 inside the 128 input: low-res rows >= 16 are padding
L = 32  # low-res side of the tiny model


def _rect(r0, r1, c0, c1, inside=10.0):
    m = torch.full((1, L, L), -10.0)
    m[0, r0:r1, c0:c1] = inside
    return m


# (low-res logits, confidence, label index) per grid point, in grid order (points_per_side=3 -> 9 prompts).
CASES = [
    (_rect(2, 8, 2, 10), 0.90, 0),  # 0: A
    (_rect(2, 8, 2, 10), 0.80, 0),  # 1: A again -> removed by NMS
    (_rect(4, 12, 16, 30), 0.40, 1),  # 2: B, low confidence
    (_rect(10, 11, 12, 13), 0.95, 2),  # 3: C, one low-res pixel: a small fragment
    (_rect(2, 14, 20, 30, inside=0.5), 0.99, 1),  # 4: unstable (logits between -1 and 1)
    (torch.full((1, L, L), -10.0), 0.98, 1),  # 5: empty mask
    (_rect(20, 30, 2, 30), 0.97, 2),  # 6: only in the padding below the image -> empty at original size
    (_rect(3, 7, 3, 9), 0.70, 1),  # 7: F inside A, IoU 0.5 with A -> kept
    (_rect(2, 8, 3, 11), 0.60, 0),  # 8: A shifted by one column, IoU 0.78 with A -> removed at nms_iou 0.7
]


def _scores(conf, label, k=len(LABELS)):
    p = np.full(k, (1 - conf) / (k - 1))
    p[label] = conf
    return torch.tensor(np.concatenate([np.log(p), [0.0]]), dtype=torch.float32)


@pytest.fixture
def setup(monkeypatch):
    torch.manual_seed(0)
    cfg = ovsam.get_config("tiny")
    model = OVSAM(cfg).eval()
    emb = F.normalize(torch.randn(len(LABELS), 1, cfg.clip_embed_dim), dim=-1)
    predictor = OVSAMPredictor(model, Vocabulary(list(LABELS), [[l] for l in LABELS], emb), device="cpu")
    img = np.random.RandomState(0).randint(0, 256, (H0, W0, 3), dtype=np.uint8)
    features = predictor.set_image(img)
    assert features.frame.resized_size == (64, 128)

    low_res = torch.stack([c[0] for c in CASES])
    scores = torch.stack([_scores(c[1], c[2]) for c in CASES])
    state = {"offset": 0, "batches": [], "points": []}
    real_encode = model.encode_prompts

    def encode_prompts(points=None, point_labels=None, boxes=None, mask_input=None):
        state["points"].append(points.clone())
        return real_encode(points, point_labels, boxes, mask_input)

    def decode(embedding, sparse, dense, image_index=None, high_res=None):
        n = sparse.shape[0]
        state["start"] = state["offset"]
        state["offset"] += n
        state["batches"].append(n)
        return low_res[state["start"] : state["start"] + n].clone()

    def recognise(pyramid, c5, low, text_embeddings, is_base, head_boxes=None, clip_boxes=None, image_index=None,
                  clip_kv=None):
        s = state["start"]
        assert torch.equal(low, low_res[s : s + low.shape[0]])
        sc = scores[s : s + low.shape[0]]
        return Recognition(sc, sc, sc, torch.zeros(low.shape[0], 5))

    monkeypatch.setattr(model, "encode_prompts", encode_prompts)
    monkeypatch.setattr(model, "decode", decode)
    monkeypatch.setattr(model, "recognise", recognise)

    def run(**overrides):
        state["offset"] = 0
        state["batches"].clear()
        state["points"].clear()
        # The crafted cases were made for these thresholds (confidences around 0.5: cases 2 and 8), not the defaults.
        cfg = AutomaticConfig(**{"points_per_side": 3, "points_per_batch": 4, "confidence_threshold": 0.5,
                                 "min_support": 0.5, **overrides})
        return AutomaticMaskGenerator(predictor, cfg).generate(features)

    return run, state


def _ids(instances):
    """Recover which crafted case each instance came from (by its probability, unique per case)."""
    by_conf = {round(c[1], 6): i for i, c in enumerate(CASES)}
    return [by_conf[round(inst.probability, 6)] for inst in instances]


def test_default_thresholds_sorted_and_deduplicated(setup):
    run, state = setup
    out = run()
    assert state["batches"] == [4, 4, 1]  # all 9 grid points, in batches of points_per_batch
    assert _ids(out) == [3, 0, 7]  # sorted by score; duplicates, low-confidence, unstable, empty removed
    scores = [inst.score for inst in out]
    assert scores == sorted(scores, reverse=True)
    for inst in out:
        assert inst.mask.shape == (H0, W0) and inst.mask.dtype == bool
        assert inst.area == int(inst.mask.sum()) > 0
        ys, xs = np.nonzero(inst.mask)
        assert inst.box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert inst.label == LABELS[inst.label_index]
        assert inst.stability == pytest.approx(1.0)
        assert inst.score == pytest.approx(inst.stability * inst.probability)
        assert inst.top_k[0].label == inst.label and len(inst.top_k) == len(LABELS)
        assert sum(s.probability for s in inst.top_k) == pytest.approx(1.0, abs=1e-5)
    a = out[1]
    assert a.label == "cat" and a.probability == pytest.approx(0.9)
    # A covers low-res rows 2..8, cols 2..10 = input px 8..32 / 8..40 = original px 6.25..25 / 6.25..31.25.
    assert np.allclose(a.box, [6, 6, 31, 25], atol=1)
    assert not a.mask[26:].any() and not a.mask[:, 32:].any()


def test_grid_points_cover_only_the_image(setup):
    run, state = setup
    run()
    pts = torch.cat(state["points"])  # [9, 1, 2] input pixels
    assert pts.shape == (9, 1, 2)
    assert pts[..., 0].min() > 0 and pts[..., 0].max() < 128
    assert pts[..., 1].min() > 0 and pts[..., 1].max() < 64  # never in the padding rows 64..128


def test_identical_masks_give_one_instance(setup):
    run, _ = setup
    out = run()
    assert sum(1 for i in out if i.label == "cat" and i.box.tolist() == out[1].box.tolist()) == 1
    # With NMS effectively off, the copy and the shifted copy (7/8 of it inside A) are still parts of A ...
    assert _ids(run(nms_iou=1.0)) == [3, 0, 7]
    # ... and with the part rule off as well, both come back.
    out_all = run(nms_iou=1.0, part_of_whole=1.01)
    assert sorted(_ids(out_all)) == [0, 1, 3, 7, 8]


def test_nms_iou_threshold(setup):
    run, _ = setup
    # Shifted A (IoU 0.78) survives once it no longer counts as a part of A; the exact copy does not.
    assert _ids(run(nms_iou=0.9, part_of_whole=1.01)) == [3, 0, 7, 8]
    assert _ids(run(nms_iou=0.4)) == [3, 0]  # F (IoU 0.5 with A) is now suppressed too


def test_confidence_threshold(setup):
    run, _ = setup
    assert _ids(run(confidence_threshold=0.3)) == [3, 0, 7, 2]
    assert _ids(run(confidence_threshold=0.92)) == [3]
    assert run(confidence_threshold=0.999) == []


def test_min_area_threshold(setup):
    run, _ = setup
    small = run()[0]
    assert _ids([small]) == [3] and small.area < 50
    out = run(min_area_fraction=50 / (H0 * W0))
    assert _ids(out) == [0, 7]
    assert all(i.area >= 50 for i in out)


def test_stability_threshold(setup):
    run, _ = setup
    # The unstable mask (case 4) passes once stability is not required (nor the support of other prompts: it is
    # its prompt's alone).
    assert _ids(run(stability_threshold=0.0, min_support=0.0)) == [3, 0, 7, 4]  # score 0: last
    assert 4 not in _ids(run(stability_threshold=0.0))
    assert 4 not in _ids(run())


def test_max_instances(setup):
    run, _ = setup
    assert _ids(run(max_instances=2)) == [3, 0]


def test_real_model_end_to_end_sizes():
    torch.manual_seed(0)
    cfg = ovsam.get_config("tiny")
    model = OVSAM(cfg).eval()
    emb = F.normalize(torch.randn(len(LABELS), 1, cfg.clip_embed_dim), dim=-1)
    predictor = OVSAMPredictor(model, Vocabulary(list(LABELS), [[l] for l in LABELS], emb), device="cpu")
    features = predictor.set_image(np.random.RandomState(1).randint(0, 256, (37, 91, 3), dtype=np.uint8))
    loose = AutomaticConfig(
        points_per_side=4, stability_threshold=0.0, confidence_threshold=0.0, min_area_fraction=0.0, nms_iou=1.0
    )
    out = AutomaticMaskGenerator(predictor, loose).generate(features)
    assert out, "with every filter off, some non-empty mask is expected"
    assert all(i.mask.shape == (37, 91) and i.area == i.mask.sum() > 0 for i in out)
    assert [i.score for i in out] == sorted((i.score for i in out), reverse=True)
    strict = AutomaticMaskGenerator(predictor, AutomaticConfig(points_per_side=4, confidence_threshold=1.01)).generate(features)
    assert strict == []


# ---------------------------------------------------------------- duplicate removal on final masks

from ovsam.automatic import encode_rle, is_edge_sliver, prompt_support, remove_duplicates  # noqa: E402


def _box_mask(r0, r1, c0, c1, shape=(60, 80)):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def _dedupe(masks, scores, labels, nms_iou=0.5, part_of_whole=0.8):
    return remove_duplicates(encode_rle(np.stack(masks)), scores, labels, nms_iou, part_of_whole)


def test_identical_masks_from_different_prompts_are_one():
    a = _box_mask(10, 30, 10, 40)
    stray = a.copy()
    stray[59, 79] = True  # one stray pixel: the box spans the image, the mask is still the same object
    assert _dedupe([a, a, stray], [0.9, 0.8, 0.95], [0, 1, 0]) == [2]


def test_nested_object_of_another_label_stays():
    big, small = _box_mask(5, 55, 5, 75), _box_mask(20, 30, 20, 30)
    assert _dedupe([big, small], [0.9, 0.8], [0, 1]) == [0, 1]
    # ... while of the same label, the small mask lies wholly inside the big one: a part of it.
    assert _dedupe([big, small], [0.9, 0.8], [0, 0]) == [0]


def test_touching_objects_stay_two():
    left, right = _box_mask(10, 40, 10, 40), _box_mask(10, 40, 40, 70)
    assert _dedupe([left, right], [0.9, 0.8], [0, 0]) == [0, 1]


def test_part_inside_whole_of_the_same_label_is_one():
    whole = _box_mask(10, 50, 10, 50)
    part = _box_mask(10, 50, 10, 25)  # 3/8 of the whole: IoU below nms_iou, yet wholly inside it
    assert _dedupe([part, whole], [0.95, 0.9], [2, 2]) == [0]  # the part scored higher: kept, whole looser
    assert _dedupe([whole, part], [0.95, 0.9], [2, 2]) == [0]
    # An object split into two kept parts: the mask covering both replaces them, though it scored lower.
    other_half = _box_mask(10, 50, 25, 50)
    assert _dedupe([part, other_half, whole], [0.95, 0.93, 0.9], [2, 2, 2]) == [2]


def test_lower_scoring_copy_with_high_iou_is_dropped_across_labels():
    a, shifted = _box_mask(10, 30, 10, 40), _box_mask(10, 30, 12, 42)  # IoU 28/32 = 0.875
    assert _dedupe([a, shifted], [0.8, 0.9], [0, 1]) == [1]
    assert _dedupe([a, shifted], [0.8, 0.9], [0, 1], nms_iou=0.9) == [1, 0]


def test_edge_slivers():
    assert is_edge_sliver(_box_mask(0, 60, 0, 2), 0.03)  # 2 px along the left border of an 80 px wide image
    assert is_edge_sliver(_box_mask(58, 60, 10, 70), 0.05)  # along the bottom
    assert not is_edge_sliver(_box_mask(0, 60, 0, 10), 0.03)  # an object cut by the border
    assert not is_edge_sliver(_box_mask(10, 12, 10, 70), 0.05)  # thin, but away from the borders
    assert not is_edge_sliver(np.zeros((60, 80), bool), 0.03)


def test_prompt_support_counts_agreeing_prompts():
    obj = torch.zeros(16, 16, dtype=torch.bool)
    obj[0:8, 0:8] = True  # a quarter of the image: of 8 prompts, 2 are expected inside it
    blob = torch.zeros(16, 16, dtype=torch.bool)
    blob[8:16, 8:16] = True
    others = [torch.roll(blob, shifts=(0, -k), dims=(0, 1)) for k in range(2, 8)]  # six different blobs
    grid = torch.stack([obj, obj, obj, blob] + others[:4])
    support = prompt_support(torch.stack([obj, blob]), grid, 0.8)
    assert support.tolist() == [1.5, 0.5]  # 3 of 2 expected votes; 1 of 2 (the others overlap it too little)
