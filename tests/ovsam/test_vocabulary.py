"""Vocabulary embeddings: templates, synonym padding, split_label, and the on-disk cache."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ovsam
from ovsam.text import TextEncoder
from ovsam.vocabulary import (
    VILD_TEMPLATES,
    Vocabulary,
    VocabularyBuilder,
    embed_synonyms,
    normalise_synonyms,
    split_label,
)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return TextEncoder.from_config(ovsam.get_config("tiny")).eval()


class _EncodeSpy:
    def __init__(self, fn):
        self.fn = fn
        self.texts = []

    def __call__(self, texts, *args, **kwargs):
        self.texts.append(list(texts))
        return self.fn(texts, *args, **kwargs)


def test_templates():
    assert len(VILD_TEMPLATES) == 14
    assert len(set(VILD_TEMPLATES)) == 14
    assert all(t.count("{}") == 1 for t in VILD_TEMPLATES)
    assert VILD_TEMPLATES[0] == "a photo of a {}."
    assert "There is a large {} in the scene." in VILD_TEMPLATES


def test_split_label_reference_quirk():
    assert split_label("tape_(sticky_cloth_or_paper)") == ["tape (sticky cloth", "paper)"]
    assert split_label("bow_(weapon)") == ["bow (weapon)"]
    assert split_label("Person,child, girl") == ["person", "child", "girl"]
    assert split_label("cup/mug") == ["cup", "mug"]
    assert split_label("salt_shaker") == ["salt shaker"]


def test_embeddings_unit_norm_shape_and_padding(encoder, tmp_path):
    vocab = VocabularyBuilder(encoder, tmp_path).build(
        ["cat", "dog", "car"], synonyms={"cat": ["kitty", "feline"], "car": ["automobile"]}
    )
    d = encoder.text.text_projection.shape[-1]
    assert tuple(vocab.embeddings.shape) == (3, 3, d)
    norms = vocab.embeddings.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert vocab.synonyms == [["cat", "kitty", "feline"], ["dog"], ["car", "automobile"]]
    e = vocab.embeddings
    # Padding repeats the class's first synonym.
    assert torch.equal(e[1, 1], e[1, 0]) and torch.equal(e[1, 2], e[1, 0])
    assert torch.equal(e[2, 2], e[2, 0])
    # Real synonyms are different prototypes.
    assert not torch.allclose(e[0, 0], e[0, 1]) and not torch.allclose(e[2, 0], e[2, 1])
    assert vocab.is_base.dtype == torch.bool and vocab.is_base.all()


def test_embedding_recipe(encoder):
    """Normalise each (name, template) feature, average over the 14 templates, normalise again."""
    emb = embed_synonyms(encoder, [["dog"], ["red car", "automobile"]])
    for row, names in ((0, ["dog", "dog"]), (1, ["red car", "automobile"])):
        for p, name in enumerate(names):
            feats = encoder.encode([t.format(name) for t in VILD_TEMPLATES])
            expected = F.normalize(F.normalize(feats, dim=-1).mean(0), dim=0)
            torch.testing.assert_close(emb[row, p], expected, rtol=1e-5, atol=1e-5)


def test_templates_are_used(encoder, monkeypatch):
    spy = _EncodeSpy(encoder.encode)
    monkeypatch.setattr(encoder, "encode", spy)
    embed_synonyms(encoder, [["cat", "kitty"], ["dog"]])
    texts = [t for call in spy.texts for t in call]
    assert len(texts) == 3 * 14
    assert "a photo of a kitty." in texts and "There is a large dog in the scene." in texts


def test_disk_cache_second_builder_does_not_encode(encoder, tmp_path, monkeypatch):
    labels = ["cat", "dog"]
    syn = {"cat": ["kitty"]}
    first = VocabularyBuilder(encoder, tmp_path).build(labels, syn)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1

    def boom(*args, **kwargs):
        raise AssertionError("encode must not be called on a disk-cache hit")

    monkeypatch.setattr(encoder, "encode", boom)
    second = VocabularyBuilder(encoder, tmp_path).build(labels, syn)
    assert torch.equal(first.embeddings, second.embeddings)
    assert second.labels == labels and second.synonyms == first.synonyms
    # A different label set is not served from the cache.
    with pytest.raises(AssertionError, match="must not be called"):
        VocabularyBuilder(encoder, tmp_path).build(["cat", "bird"], syn)


def test_memory_cache_within_one_builder(encoder, tmp_path, monkeypatch):
    builder = VocabularyBuilder(encoder, tmp_path)
    spy = _EncodeSpy(encoder.encode)
    monkeypatch.setattr(encoder, "encode", spy)
    builder.build(["a", "b"])
    n = len(spy.texts)
    assert n >= 1
    for f in tmp_path.glob("*.pt"):
        f.unlink()
    builder.build(["a", "b"])
    assert len(spy.texts) == n


def test_corrupt_cache_file_is_rebuilt(encoder, tmp_path, monkeypatch):
    first = VocabularyBuilder(encoder, tmp_path).build(["cat", "dog"])
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(b"not a torch file")
    spy = _EncodeSpy(encoder.encode)
    monkeypatch.setattr(encoder, "encode", spy)
    again = VocabularyBuilder(encoder, tmp_path).build(["cat", "dog"])
    assert len(spy.texts) >= 1
    torch.testing.assert_close(again.embeddings, first.embeddings)


def test_cache_keys(encoder, tmp_path):
    b = VocabularyBuilder(encoder, tmp_path)
    key = lambda labels, syn=None: b.cache_key(normalise_synonyms(labels, syn), VILD_TEMPLATES)  # noqa: E731
    base = key(["cat", "dog"])
    assert key(["cat", "dog"]) == base
    assert key(["cat", "dog", "car"]) != base
    assert key(["dog", "cat"]) != base  # order is the row order of the embeddings
    assert key(["cat", "dog"], {"cat": ["kitty"]}) != base
    assert key(["cat", "dog"], {"cat": ["kitty"]}) != key(["cat", "dog"], {"cat": ["feline"]})
    assert b.cache_key(normalise_synonyms(["cat", "dog"]), VILD_TEMPLATES[:3]) != base
    # A different text encoder (other weights) has different keys.
    torch.manual_seed(123)
    other = TextEncoder.from_config(ovsam.get_config("tiny"))
    assert VocabularyBuilder(other, tmp_path).cache_key(normalise_synonyms(["cat", "dog"]), VILD_TEMPLATES) != base


def test_base_labels(encoder, tmp_path):
    vocab = VocabularyBuilder(encoder, tmp_path).build(["cat", "dog", "car"], base_labels=["dog"])
    assert vocab.is_base.tolist() == [False, True, False]
    sub = vocab.subset(["car", "dog"])
    assert sub.labels == ["car", "dog"] and sub.is_base.tolist() == [False, True]
    assert torch.equal(sub.embeddings[0], vocab.embeddings[2])


def test_normalise_synonyms_dedups_and_keeps_label_first():
    assert normalise_synonyms(["cat"], {"cat": ["kitty", "cat", " kitty ", ""]}) == [["cat", "kitty"]]


def test_vocabulary_validation():
    emb = F.normalize(torch.randn(2, 1, 8), dim=-1)
    with pytest.raises(ValueError, match="at least one"):
        Vocabulary([], [], emb[:0])
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary(["a", "a"], [["a"], ["a"]], emb)
    with pytest.raises(ValueError, match="unit-norm"):
        Vocabulary(["a", "b"], [["a"], ["b"]], emb * 2)
    with pytest.raises(ValueError, match="one embedding row"):
        Vocabulary(["a", "b", "c"], [["a"], ["b"], ["c"]], emb)
    v = Vocabulary(["a", "b"], [["a"], ["b"]], emb)
    assert len(v) == 2 and v.index("b") == 1
