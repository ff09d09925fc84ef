"""One is_base rule: the backend serves a project's labels with the base/novel weighting the promotion gate scores."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_finetune_support import make_tiny_artifact  # noqa: E402

STORED = ["circle", "square", "triangle", "star"]
TRAINED_ON = ["circle", "triangle"]  # like official COCO weights: the stored vocabulary has base and novel classes


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from ovsam.artifact import load_artifact, save_artifact

    root = tmp_path_factory.mktemp("rule")
    art = load_artifact(make_tiny_artifact(root / "tiny.safetensors", labels=STORED))
    path = save_artifact(root / "mixed.safetensors", art.model, art.vocabulary.with_base(TRAINED_ON), "mixed-1",
                         text_encoder=art.text_encoder)
    return load_artifact(path)


@pytest.mark.parametrize("labels, synonyms", [
    (["square", "circle"], {}),  # stored rows
    (["star", "circle", "hexagon"], {}),  # a new label: the text tower for all, hexagon novel
    (["circle", "triangle", "square"], {"circle": ["disc"]}),  # other synonyms: the text tower
])
def test_backend_and_gate_give_the_same_labels_the_same_is_base(artifact, tmp_path, labels, synonyms):
    from labelstudio_backend.runtime import ModelSource, ServingModel
    from training.classifier import classifier_vocabulary
    from training.finetune_config import FinetuneConfig

    served = ServingModel(artifact, ModelSource("checkpoint", None), "cpu", 0).predictor_for(labels, synonyms).vocabulary
    cfg = FinetuneConfig(base="", out=str(tmp_path), cache_dir=str(tmp_path / "vocab-cache"))
    gated = classifier_vocabulary(artifact, cfg, SimpleNamespace(labels=labels, synonyms=synonyms))
    expected = [label in TRAINED_ON for label in labels]
    assert served.labels == gated.labels == labels
    assert served.is_base.tolist() == gated.is_base.tolist() == expected
    assert torch.equal(served.embeddings, gated.embeddings)


def test_a_fine_tuned_classifier_is_base_on_its_training_labels_only(artifact, tmp_path):
    from training.classifier import classifier_vocabulary, trained_classifier
    from training.finetune_config import FinetuneConfig

    cfg = FinetuneConfig(base="", out=str(tmp_path), classifier_labels=["square", "circle", "hexagon"],
                         cache_dir=str(tmp_path / "vocab-cache"))
    data = SimpleNamespace(labels=["square", "hexagon"], synonyms={})
    classifier = classifier_vocabulary(artifact, cfg, data)
    assert classifier.is_base.tolist() == [False, True, False]  # as the base model serves them
    assert trained_classifier(classifier, data.labels).is_base.tolist() == [True, False, True]
