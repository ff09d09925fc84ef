"""Label-embedding fitting: rows move to the head's view of annotated objects, everything else stays."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovsam.vocabulary import Vocabulary
from training.label_fit import FIT_LOGIT_SCALE, fit_label_embeddings, label_accuracy, unique_instances

DIM = 16


def clusters(n_per: int, centres: torch.Tensor, noise: float, seed: int):
    """n_per noisy unit vectors around each centre; their targets."""
    g = torch.Generator().manual_seed(seed)
    feats = centres.repeat_interleave(n_per, 0) + noise * torch.randn(len(centres) * n_per, DIM, generator=g)
    return F.normalize(feats, dim=-1), torch.arange(len(centres)).repeat_interleave(n_per)


def vocab_of(rows: torch.Tensor, synonyms=None) -> Vocabulary:
    labels = [f"label{i}" for i in range(len(rows))]
    syn = synonyms or [[l] for l in labels]
    return Vocabulary(labels, syn, F.normalize(rows, dim=-1).unsqueeze(1))


@pytest.fixture
def centres():
    return F.normalize(torch.randn(4, DIM, generator=torch.Generator().manual_seed(0)), dim=-1)


def test_unrelated_names_start_near_chance_and_fitted_rows_name_new_objects(centres):
    text = torch.randn(4, 1, DIM, generator=torch.Generator().manual_seed(1))  # names the head never tied to these
    vocab = vocab_of(text[:, 0])
    train_x, train_y = clusters(5, centres, 0.15, seed=2)
    test_x, test_y = clusters(50, centres, 0.15, seed=3)
    fit = fit_label_embeddings(vocab, train_x, train_y, logit_scale=100.0)
    assert label_accuracy(test_x, test_y, vocab.embeddings) < 0.6
    assert fit.accuracy_before < 0.6 and fit.accuracy_after == 1.0
    oracle = label_accuracy(test_x, test_y, centres.unsqueeze(1))  # rows at the true centres
    assert label_accuracy(test_x, test_y, fit.vocabulary.embeddings) >= min(oracle, 0.97) - 0.02
    norms = fit.vocabulary.embeddings.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert fit.objects == {"label0": 5, "label1": 5, "label2": 5, "label3": 5}
    assert fit.vocabulary.labels == vocab.labels and torch.equal(fit.vocabulary.is_base, vocab.is_base)


def test_the_default_softer_fit_names_more_new_objects_of_overlapping_classes_than_the_heads_scale():
    """Few annotated objects of classes that overlap: the head's scale (100) fits the rows to the hardest few."""
    assert FIT_LOGIT_SCALE < 100.0
    soft, sharp = [], []
    for seed in range(6):
        centres = F.normalize(torch.randn(4, DIM, generator=torch.Generator().manual_seed(seed)), dim=-1)
        vocab = vocab_of(torch.randn(4, DIM, generator=torch.Generator().manual_seed(99)))
        x, y = clusters(20, centres, 0.3, seed=10 + seed)
        test_x, test_y = clusters(300, centres, 0.3, seed=100 + seed)
        soft.append(label_accuracy(test_x, test_y, fit_label_embeddings(vocab, x, y).vocabulary.embeddings))
        sharp.append(label_accuracy(test_x, test_y, fit_label_embeddings(vocab, x, y, logit_scale=100.0).vocabulary.embeddings))
    assert sum(soft) / 6 > sum(sharp) / 6 + 0.01, (soft, sharp)
    assert sum(a > b for a, b in zip(soft, sharp)) >= 5, (soft, sharp)


def test_labels_without_objects_keep_their_text_rows_and_synonym_rows_share_the_fit(centres):
    text = F.normalize(torch.randn(4, 2, DIM, generator=torch.Generator().manual_seed(4)), dim=-1)
    vocab = Vocabulary(["a", "b", "c", "d"], [["a", "a2"], ["b", "b2"], ["c", "c2"], ["d", "d2"]], text)
    x, y = clusters(6, centres[:3], 0.2, seed=5)  # nobody annotated "d"
    fit = fit_label_embeddings(vocab, x, y, logit_scale=50.0)
    rows = fit.vocabulary.embeddings
    assert torch.equal(rows[3], text[3])
    assert fit.objects["d"] == 0
    for k in range(3):
        assert torch.equal(rows[k, 0], rows[k, 1])
        assert not torch.allclose(rows[k], text[k])
    assert fit.vocabulary.synonyms == vocab.synonyms
    views = fit_label_embeddings(vocab, torch.cat([x, x, x]), y.repeat(3), logit_scale=50.0, objects=y)
    assert views.objects == fit.objects  # three views of each object are still one object each


def test_fit_is_deterministic_and_refuses_empty_or_mismatched_input(centres):
    vocab = vocab_of(torch.randn(4, DIM, generator=torch.Generator().manual_seed(6)))
    x, y = clusters(3, centres, 0.3, seed=7)
    a = fit_label_embeddings(vocab, x, y, 100.0).vocabulary.embeddings
    b = fit_label_embeddings(vocab, x, y, 100.0).vocabulary.embeddings
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="N targets"):
        fit_label_embeddings(vocab, x, y[:-1], 100.0)
    with pytest.raises(ValueError, match="nothing to fit"):
        fit_label_embeddings(vocab, x[:2], torch.tensor([4, 4]), 100.0)  # background only


def test_unique_instances_keeps_the_first_prompt_of_each_instance():
    assert unique_instances(torch.tensor([2, 0, 2, 1, 0, 1])) == [0, 1, 3]
    assert unique_instances(torch.tensor([], dtype=torch.long)) == []
