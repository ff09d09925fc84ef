"""Base/novel-aware geometric-mean fusion of head and CLIP logits (docs/REFERENCE_NOTES.md B7)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ovsam.fusion import EXCLUDED_SCORE, foreground_probabilities, fuse_logits


ALPHA, BETA = 0.1, 0.9


def _softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _reference(head, clip, is_base, valid, a=ALPHA, b=BETA):
    """Spec §1.9 literally (float64, no underflow for these small logits)."""
    q, c = _softmax(head), _softmax(clip)
    ovl = np.concatenate([np.asarray(is_base, dtype=np.float64), [1.0]])
    out = np.empty_like(q)
    for n in range(q.shape[0]):
        aa, bb = (a, b) if valid[n] else (0.0, 0.0)
        out[n] = ovl * np.log(q[n] ** (1 - aa) * c[n] ** aa) + (1 - ovl) * np.log(q[n] ** (1 - bb) * c[n] ** bb)
    return out


def test_hand_computed_example():
    # K = 3: class 0 base, classes 1 and 2 novel; the last column is background.
    head = torch.zeros(1, 4)  # q = 1/4 everywhere
    clip = torch.tensor([[math.log(2.0), 0.0, 0.0, 0.0]])  # c = [2/5, 1/5, 1/5, 1/5]
    is_base = torch.tensor([True, False, False])
    score = fuse_logits(head, clip, is_base, torch.tensor([True]))
    expected = torch.tensor(
        [
            [
                0.9 * math.log(0.25) + 0.1 * math.log(0.4),  # base: head 0.9, CLIP 0.1
                0.1 * math.log(0.25) + 0.9 * math.log(0.2),  # novel: head 0.1, CLIP 0.9
                0.1 * math.log(0.25) + 0.9 * math.log(0.2),
                0.9 * math.log(0.25) + 0.1 * math.log(0.2),  # background counts as base
            ]
        ]
    )
    torch.testing.assert_close(score, expected, rtol=1e-6, atol=1e-6)
    probs = foreground_probabilities(score)
    assert probs.shape == (1, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1))


def test_matches_spec_formula_on_random_small_logits():
    g = torch.Generator().manual_seed(0)
    head = torch.randn(6, 8, generator=g) * 3
    clip = torch.randn(6, 8, generator=g) * 3
    is_base = torch.tensor([True, False, True, True, False, False, True])
    valid = torch.tensor([True, True, False, True, False, True])
    got = fuse_logits(head, clip, is_base, valid)
    exp = _reference(head.numpy(), clip.numpy(), is_base.numpy(), valid.numpy())
    np.testing.assert_allclose(got.numpy(), exp, rtol=1e-5, atol=1e-5)


def test_base_and_novel_weights():
    g = torch.Generator().manual_seed(1)
    head = torch.randn(3, 5, generator=g)
    clip = torch.randn(3, 5, generator=g)
    is_base = torch.tensor([True, False, True, False])
    valid = torch.ones(3, dtype=torch.bool)
    log_q = torch.log_softmax(head, -1)
    log_c = torch.log_softmax(clip, -1)
    score = fuse_logits(head, clip, is_base, valid)
    w = torch.tensor([ALPHA, BETA, ALPHA, BETA, ALPHA])
    torch.testing.assert_close(score, (1 - w) * log_q + w * log_c)
    # Other alpha/beta are honoured.
    score2 = fuse_logits(head, clip, is_base, valid, alpha=0.3, beta=0.6)
    w2 = torch.tensor([0.3, 0.6, 0.3, 0.6, 0.3])
    torch.testing.assert_close(score2, (1 - w2) * log_q + w2 * log_c)
    assert not torch.allclose(score, score2)


def test_invalid_is_pure_head():
    g = torch.Generator().manual_seed(2)
    head = torch.randn(2, 4, generator=g)
    clip = torch.randn(2, 4, generator=g)
    is_base = torch.tensor([True, False, False])
    score = fuse_logits(head, clip, is_base, torch.tensor([False, True]))
    torch.testing.assert_close(score[0], torch.log_softmax(head[0], -1), rtol=0, atol=0)
    assert not torch.allclose(score[1], torch.log_softmax(head[1], -1))
    # The invalid row does not depend on the CLIP logits at all.
    score_b = fuse_logits(head, clip * 5 + 3, is_base, torch.tensor([False, True]))
    assert torch.equal(score[0], score_b[0])


def test_underflow_gives_finite_scores_where_naive_formula_gives_nan():
    # Class 1 is novel; its head probability underflows to exactly 0 in float32 (logits differ by 200).
    head = torch.tensor([[0.0, -200.0, 0.0, 0.0]])
    clip = torch.tensor([[0.0, 1.0, 0.0, -200.0]])  # background CLIP probability underflows too
    is_base = torch.tensor([True, False, True])
    valid = torch.tensor([True])

    q = torch.softmax(head, -1)
    c = torch.softmax(clip, -1)
    assert q[0, 1].item() == 0.0 and c[0, 3].item() == 0.0
    # The reference: ovl·log(q^(1-a)·c^a) + (1-ovl)·log(q^(1-b)·c^b)
    ovl = torch.tensor([1.0, 0.0, 1.0, 1.0])
    naive = ovl * torch.log(q ** (1 - ALPHA) * c**ALPHA) + (1 - ovl) * torch.log(q ** (1 - BETA) * c**BETA)
    assert torch.isnan(naive).any()  # -inf · 0
    assert not torch.isfinite(naive).all()

    score = fuse_logits(head, clip, is_base, valid)
    assert torch.isfinite(score).all()
    # Exact log-space values (float64): log q1 = -200 - log(3 + e^-200), etc.
    lq = head.double() - torch.logsumexp(head.double(), -1, keepdim=True)
    lc = clip.double() - torch.logsumexp(clip.double(), -1, keepdim=True)
    w = torch.tensor([ALPHA, BETA, ALPHA, ALPHA], dtype=torch.float64)
    expected = ((1 - w) * lq + w * lc).float()
    torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-4)
    assert score[0, 1].item() == pytest.approx(0.1 * (-200 - math.log(3)) + 0.9 * (1 - math.log(2 + math.e)), abs=1e-3)
    probs = foreground_probabilities(score)
    assert torch.isfinite(probs).all()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_underflow_with_invalid_row_is_finite():
    head = torch.tensor([[0.0, -300.0, 5.0]])
    clip = torch.tensor([[-300.0, 0.0, 0.0]])
    score = fuse_logits(head, clip, torch.tensor([False, False]), torch.tensor([False]))
    assert torch.isfinite(score).all()
    torch.testing.assert_close(score, torch.log_softmax(head, -1))


def test_minus_infinity_second_logits_do_not_poison_pure_head_rows():
    # -inf CLIP logits (e.g. a masked class) give log c = -inf; 0 · -inf must not turn into NaN.
    head = torch.tensor([[1.0, 2.0, 0.5, 0.0], [1.0, 2.0, 0.5, 0.0]])
    clip = torch.tensor([[-float("inf"), 0.0, 0.0, 0.0], [-float("inf"), 0.0, 0.0, 0.0]])
    is_base = torch.tensor([True, False, False])
    score = fuse_logits(head, clip, is_base, torch.tensor([False, True]))
    torch.testing.assert_close(score[0], torch.log_softmax(head[0], -1))
    assert not torch.isnan(score).any()
    assert torch.isfinite(score[1, 1:]).all()


def test_excluded_classes_get_minus_1000():
    g = torch.Generator().manual_seed(3)
    head = torch.randn(2, 5, generator=g)
    clip = torch.randn(2, 5, generator=g)
    is_base = torch.tensor([True, False, False, True])
    excluded = torch.tensor([False, False, True, False])
    score = fuse_logits(head, clip, is_base, torch.tensor([True, False]), excluded=excluded)
    assert torch.all(score[:, 2] == EXCLUDED_SCORE)
    assert EXCLUDED_SCORE == -1000.0
    keep = [0, 1, 3, 4]
    ref = fuse_logits(head, clip, is_base, torch.tensor([True, False]))
    torch.testing.assert_close(score[:, keep], ref[:, keep])
    probs = foreground_probabilities(score)
    assert torch.all(probs[:, 2] < 1e-30)
    # Even a class the head is certain about is never predicted once excluded.
    head2 = torch.tensor([[0.0, 0.0, 50.0, 0.0, 0.0]])
    s2 = fuse_logits(head2, torch.zeros(1, 5), is_base, torch.tensor([True]), excluded=excluded)
    assert foreground_probabilities(s2).argmax().item() != 2


def test_foreground_probabilities_drop_background():
    scores = torch.tensor([[0.0, 1.0, 2.0, 100.0]])  # background would win if it were included
    p = foreground_probabilities(scores)
    assert p.shape == (1, 3)
    assert p.argmax().item() == 2
    torch.testing.assert_close(p.sum(-1), torch.ones(1))
    torch.testing.assert_close(p, torch.softmax(scores[:, :3], -1))
