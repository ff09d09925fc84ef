"""Predictor semantics: original-pixel prompts, validation, negative points, refinement, batching, top-k."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ovsam
from ovsam.model import OVSAM
from ovsam.predictor import OVSAMPredictor, Prompt
from ovsam.vocabulary import Vocabulary


LABELS = ["cat", "dog", "car", "tree", "person", "cup"]
H0, W0 = 37, 91  # resized to 52x128: x and y scales differ (128/91 vs 52/37)


def _vocab(dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(len(LABELS), 2, dim, generator=g), dim=-1)
    return Vocabulary(list(LABELS), [[l] for l in LABELS], emb, torch.tensor([True, True, True, False, False, True]))


def _image(h=H0, w=W0, seed=0):
    rs = np.random.RandomState(seed)
    img = rs.randint(0, 256, (h, w, 3), dtype=np.uint8)
    img[h // 4 : h // 2, w // 5 : w // 2] = (250, 30, 30)  # some structure
    return img


@pytest.fixture
def predictor():
    torch.manual_seed(0)
    cfg = ovsam.get_config("tiny")
    model = OVSAM(cfg).eval()
    return OVSAMPredictor(model, _vocab(cfg.clip_embed_dim), device="cpu")


@pytest.fixture
def loaded(predictor):
    predictor.set_image(_image())
    return predictor


class _Spy:
    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


def test_points_to_input_scales_each_axis():
    from ovsam.transforms import ImageFrame

    frame = ImageFrame.for_image(H0, W0, 128)
    rh, rw = frame.resized_size
    assert (rh, rw) == (52, 128) and rw / W0 != rh / H0
    pts = frame.points_to_input(np.array([[[10.0, 20.0], [90.0, 36.0]]]))
    expected = torch.tensor([[[10.0 * rw / W0, 20.0 * rh / H0], [90.0 * rw / W0, 36.0 * rh / H0]]])
    torch.testing.assert_close(pts, expected)


def test_predictor_passes_scaled_coordinates_to_encode_prompts(loaded, monkeypatch):
    spy = _Spy(loaded.model.encode_prompts)
    monkeypatch.setattr(loaded.model, "encode_prompts", spy)
    frame = loaded.current_features.frame
    rh, rw = frame.resized_size
    loaded.predict(points=np.array([[10.0, 20.0], [50.0, 5.0]]), point_labels=np.array([1, 0]), box=np.array([2.0, 3.0, 80.0, 30.0]))
    assert len(spy.calls) == 1
    points, labels, boxes, masks = spy.calls[0][0]
    torch.testing.assert_close(points, torch.tensor([[[10.0 * rw / W0, 20.0 * rh / H0], [50.0 * rw / W0, 5.0 * rh / H0]]]))
    assert labels.tolist() == [[1, 0]]
    torch.testing.assert_close(boxes, torch.tensor([[2.0 * rw / W0, 3.0 * rh / H0, 80.0 * rw / W0, 30.0 * rh / H0]]))
    assert masks is None


def test_prediction_fields(loaded):
    pred = loaded.predict(points=np.array([[30.0, 15.0]]), top_k=3)
    assert pred.mask.shape == (H0, W0) and pred.mask.dtype == bool
    assert tuple(pred.low_res_logits.shape) == (1, 32, 32)
    assert pred.label == LABELS[pred.label_index]
    assert pred.label == pred.top_k[0].label and pred.probability == pred.top_k[0].probability
    assert 0.0 <= pred.stability <= 1.0
    assert pred.score == pytest.approx(pred.stability * pred.probability)
    if pred.mask.any():
        ys, xs = np.nonzero(pred.mask)
        assert pred.box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    else:
        assert pred.box.tolist() == [0, 0, 0, 0]


def test_mask_matches_low_res_logits_upscaled(loaded):
    from ovsam.transforms import upscale_mask_logits

    pred = loaded.predict(box=np.array([5.0, 5.0, 60.0, 30.0]))
    expected = (upscale_mask_logits(pred.low_res_logits[None], loaded.current_features.frame)[0] > 0).numpy()
    assert np.array_equal(pred.mask, expected)


@pytest.mark.parametrize("size", [(1, 300), (300, 1), (1, 1), (5, 2)])
def test_thin_images_give_original_size_masks(predictor, size):
    h, w = size
    predictor.set_image(np.full((h, w, 3), 127, np.uint8))
    pred = predictor.predict(points=np.array([[w / 2, h / 2]]))
    assert pred.mask.shape == (h, w)
    pred = predictor.predict(box=np.array([0.0, 0.0, float(w), float(h)]))
    assert pred.mask.shape == (h, w)


def test_top_k_sorted_and_probabilities(loaded):
    pred = loaded.predict(points=np.array([[30.0, 15.0]]), top_k=3)
    probs = [s.probability for s in pred.top_k]
    assert len(probs) == 3
    assert probs == sorted(probs, reverse=True)
    assert sum(probs) <= 1.0 + 1e-6
    full = loaded.predict(points=np.array([[30.0, 15.0]]), top_k=len(LABELS))
    assert sorted(s.label for s in full.top_k) == sorted(LABELS)
    assert sum(s.probability for s in full.top_k) == pytest.approx(1.0, abs=1e-5)
    assert [s.label for s in full.top_k[:3]] == [s.label for s in pred.top_k]
    big = loaded.predict(points=np.array([[30.0, 15.0]]), top_k=100)
    assert len(big.top_k) == len(LABELS)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(points=np.array([[100.0, 5.0]])), "outside"),
        (dict(points=np.array([[-1.0, 5.0]])), "outside"),
        (dict(points=np.array([[5.0, 38.0]])), "outside"),
        (dict(), "empty prompt"),
        (dict(points=np.zeros((0, 2))), "empty prompt"),
        (dict(points=np.array([[5.0, 5.0], [6.0, 6.0]]), point_labels=np.array([1])), "point labels"),
        (dict(points=np.array([[5.0, 5.0]]), point_labels=np.array([2])), "positive"),
        (dict(points=np.array([[5.0, 5.0]]), point_labels=np.array([0])), "positive"),
        (dict(points=np.array([[np.nan, 5.0]])), "finite"),
        (dict(box=np.array([10.0, 10.0, 10.0, 20.0])), "no area"),
        (dict(box=np.array([10.0, 10.0, 20.0, 5.0])), "no area"),
        (dict(box=np.array([1.0, 2.0, 3.0])), "four"),
        (dict(box=np.array([200.0, 0.0, 300.0, 20.0])), "outside"),
    ],
)
def test_invalid_prompts_are_clear_value_errors(loaded, kwargs, message):
    with pytest.raises(ValueError, match=message):
        loaded.predict(**kwargs)


def test_predict_before_set_image_is_value_error(predictor):
    with pytest.raises(ValueError, match="set_image"):
        predictor.predict(points=np.array([[1.0, 1.0]]))


def test_negative_points_change_the_mask(loaded):
    pos = loaded.predict(points=np.array([[30.0, 15.0]]))
    pos_neg = loaded.predict(points=np.array([[30.0, 15.0], [60.0, 25.0]]), point_labels=np.array([1, 0]))
    pos_pos = loaded.predict(points=np.array([[30.0, 15.0], [60.0, 25.0]]), point_labels=np.array([1, 1]))
    assert not torch.allclose(pos.low_res_logits, pos_neg.low_res_logits)
    # Same structure, only the label differs: the label is really used.
    assert not torch.allclose(pos_pos.low_res_logits, pos_neg.low_res_logits)


def test_refinement_uses_sam_mask_prompt(loaded):
    hook_calls = []
    handle = loaded.model.prompt_encoder.mask_downscaling.register_forward_hook(
        lambda mod, inp, out: hook_calls.append(tuple(inp[0].shape))
    )
    try:
        first = loaded.predict(points=np.array([[30.0, 15.0]]))
        assert hook_calls == []
        refined = loaded.predict(points=np.array([[30.0, 15.0]]), mask_input=first.low_res_logits)
        assert hook_calls == [(1, 1, 32, 32)]
    finally:
        handle.remove()
    assert not torch.allclose(first.low_res_logits, refined.low_res_logits)
    # Feeding a different previous mask gives a different result: the mask content matters.
    other = loaded.predict(points=np.array([[30.0, 15.0]]), mask_input=-first.low_res_logits)
    assert not torch.allclose(other.low_res_logits, refined.low_res_logits)


def test_predict_batch_mixed_structures_in_input_order(loaded):
    prev = loaded.predict(points=np.array([[20.0, 10.0]]))
    prompts = [
        Prompt(points=np.array([[10.0, 20.0]])),
        Prompt(box=np.array([5.0, 5.0, 60.0, 30.0])),
        Prompt(points=np.array([[10.0, 20.0], [50.0, 10.0]]), point_labels=np.array([1, 0])),
        Prompt(points=np.array([[40.0, 15.0]]), box=np.array([30.0, 5.0, 80.0, 30.0])),
        Prompt(points=np.array([[70.0, 30.0]])),
        Prompt(box=np.array([0.0, 0.0, 91.0, 37.0])),
        Prompt(points=np.array([[20.0, 10.0]]), mask_input=prev.low_res_logits),
        Prompt(points=np.array([[85.0, 2.0], [3.0, 33.0]]), point_labels=np.array([1, 1])),
    ]
    batch = loaded.predict_batch(prompts, top_k=4)
    assert len(batch) == len(prompts)
    for prompt, got in zip(prompts, batch):
        one = loaded.predict(prompt.points, prompt.point_labels, prompt.box, prompt.mask_input, top_k=4)
        torch.testing.assert_close(got.low_res_logits, one.low_res_logits, rtol=1e-4, atol=1e-4)
        assert got.label == one.label
        assert [s.label for s in got.top_k] == [s.label for s in one.top_k]
        np.testing.assert_allclose([s.probability for s in got.top_k], [s.probability for s in one.top_k], atol=1e-4)
    # Distinct prompts gave distinct results, so the order check above is meaningful.
    assert not torch.allclose(batch[0].low_res_logits, batch[4].low_res_logits)
    assert not torch.allclose(batch[1].low_res_logits, batch[5].low_res_logits)


def test_predict_batch_respects_max_batch(loaded, monkeypatch):
    loaded.max_batch = 2
    spy = _Spy(loaded.model.decode)
    monkeypatch.setattr(loaded.model, "decode", spy)
    prompts = [Prompt(points=np.array([[5.0 + 10 * i, 10.0]])) for i in range(5)]
    batch = loaded.predict_batch(prompts)
    assert [c[0][1].shape[0] for c in spy.calls] == [2, 2, 1]
    assert len(batch) == 5


def test_explicit_features_override_current_image(predictor):
    f1 = predictor.set_image(_image(seed=1))
    a = predictor.predict(points=np.array([[30.0, 15.0]]))
    predictor.set_image(_image(seed=2))
    b = predictor.predict(points=np.array([[30.0, 15.0]]))
    c = predictor.predict(points=np.array([[30.0, 15.0]]), features=f1)
    assert not torch.allclose(a.low_res_logits, b.low_res_logits)
    torch.testing.assert_close(a.low_res_logits, c.low_res_logits)


def test_set_vocabulary_changes_labels(loaded):
    before = loaded.predict(points=np.array([[30.0, 15.0]]), top_k=6)
    emb = F.normalize(torch.randn(2, 1, loaded.model.cfg.clip_embed_dim), dim=-1)
    loaded.set_vocabulary(Vocabulary(["apple", "pear"], [["apple"], ["pear"]], emb))
    after = loaded.predict(points=np.array([[30.0, 15.0]]), top_k=6)
    assert after.label in ("apple", "pear") and len(after.top_k) == 2
    assert len(before.top_k) == 6


def test_current_image_is_per_thread():
    import threading

    torch.manual_seed(0)
    cfg = ovsam.get_config("tiny")
    model = OVSAM(cfg).eval()
    vocab = Vocabulary(["a", "b"], [["a"], ["b"]], torch.nn.functional.normalize(torch.randn(2, 1, cfg.clip_embed_dim), dim=-1))
    pred = OVSAMPredictor(model, vocab)
    mine = pred.set_image(np.zeros((40, 60, 3), np.uint8))
    other = {}
    thread = threading.Thread(target=lambda: other.setdefault("f", pred.set_image(np.full((50, 30, 3), 200, np.uint8))))
    thread.start()
    thread.join()
    assert pred.current_features is mine and other["f"] is not mine


def test_excluded_labels_stay_in_the_softmax_but_are_never_predicted(loaded):
    """The reference's 15 COCO classes in neither split: fused, then -1000 (not dropped from the vocabulary)."""
    prompts = [Prompt(points=np.array([[x, y]], np.float32)) for x in (10, 40, 70) for y in (5, 20, 33)]
    plain = loaded.predict_batch(prompts, top_k=6)
    top = {p.label for p in plain}
    loaded.set_vocabulary(loaded.vocabulary.with_excluded(sorted(top)))
    excluded = loaded.predict_batch(prompts, top_k=6)
    assert not {p.label for p in excluded} & top
    assert all(s.probability == 0.0 for p in excluded for s in p.top_k if s.label in top)
    # The remaining labels keep their order: excluding changes nothing else in the fused scores.
    for a, b in zip(plain, excluded):
        kept = [s.label for s in a.top_k if s.label not in top]
        assert [s.label for s in b.top_k if s.label not in top] == kept


def _close_features(a, b, tol=1e-4):
    pairs = [(a.embedding, b.embedding), (a.c5, b.c5), *zip(a.pyramid, b.pyramid)]
    return a.frame.original_size == b.frame.original_size and all(
        x.shape == y.shape and torch.allclose(x, y, rtol=tol, atol=tol * float(y.abs().max())) for x, y in pairs)


def test_set_images_encodes_the_uncached_images_in_one_batch_equal_to_one_by_one(predictor):
    images = [_image(seed=1), _image(60, 40, seed=2), _image(90, 90, seed=3)]
    one_by_one = OVSAMPredictor(predictor.model, predictor.vocabulary, device="cpu")
    single = [one_by_one.set_image(im) for im in images]

    spy = _Spy(predictor.model.encode_outputs)
    predictor.model.encode_outputs = spy
    batched = predictor.set_images(images)
    assert [args[0].shape[0] for args, _ in spy.calls] == [3]  # one batch of three
    assert all(_close_features(b, s) for b, s in zip(batched, single))
    # each image's features own their bytes (not views of the batch), and are cached as set_image caches them
    assert [b.nbytes for b in batched] == [s.nbytes for s in single]
    assert all(b.embedding.untyped_storage().nbytes() == b.embedding.nbytes for b in batched)
    assert predictor.cache.nbytes == sum(s.nbytes for s in single)
    assert predictor.set_image(images[1]) is batched[1]
    # the same prompt decodes the same mask logits on batch-encoded and one-by-one features (equal up to rounding)
    prompt = dict(points=np.array([[20.0, 15.0]]), point_labels=np.array([1]))
    from_batch = predictor.predict(**prompt, features=batched[0])
    from_single = one_by_one.predict(**prompt, features=single[0])
    assert torch.allclose(from_batch.low_res_logits, from_single.low_res_logits, rtol=1e-4, atol=1e-4)
    assert (from_batch.mask != from_single.mask).mean() < 0.005

    # cached images are not encoded again; only the new one is
    spy.calls.clear()
    again = predictor.set_images([images[0], _image(50, 70, seed=4), images[2]])
    assert [args[0].shape[0] for args, _ in spy.calls] == [1]
    assert again[0] is batched[0] and again[2] is batched[2]


def test_set_images_falls_back_to_one_by_one_when_a_batch_runs_out_of_memory(predictor, caplog):
    images = [_image(seed=1), _image(60, 40, seed=2)]
    want = [OVSAMPredictor(predictor.model, predictor.vocabulary, device="cpu").set_image(im) for im in images]

    def out_of_memory(batch):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    predictor.image_encoder.encode_images = out_of_memory
    with caplog.at_level("WARNING"):
        got = predictor.set_images(images)
    assert all(_close_features(g, w) for g, w in zip(got, want))
    assert "one by one" in caplog.text and "PREDICT_BATCH_IMAGES" in caplog.text
