"""The reference's class texts and splits (ovsam/data/coco_class_texts.json) and its LVIS name rule."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ovsam
from ovsam.checkpoint import COCO_BASE_CLASSES, COCO_CLASSES, COCO_NOVEL_CLASSES
from ovsam.class_texts import COCO_TEXTS_FILE, coco_reference_vocabulary, lvis_reference_vocabulary
from ovsam.text import TextEncoder
from ovsam.vocabulary import VocabularyBuilder, split_label

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "reference_golden"


def test_coco_texts_and_split_are_the_reference_ones():
    ref = coco_reference_vocabulary()
    assert ref.labels == COCO_CLASSES
    assert sum(len(ref.texts[l]) for l in ref.labels) == 173
    assert sum(ref.texts[l] != [l] for l in ref.labels) == 53
    assert len(ref.texts["person"]) == 17 and ref.texts["person"][:3] == ["person", "child", "girl"]
    assert ref.texts["remote"] == ["tv remote", "remote control"] and ref.texts["orange"] == ["orange fruit"]
    assert set(ref.base) == set(COCO_BASE_CLASSES) and set(ref.novel) == set(COCO_NOVEL_CLASSES)
    assert len(ref.excluded) == 15 and not set(ref.excluded) & (set(ref.base) | set(ref.novel))
    # The golden set's per-class indicator (1 base, 2 novel, 0 excluded) says the same.
    golden = json.loads((GOLDEN_DIR / "golden_small.json").read_text())["classes"]
    indicator = [1 if l in ref.base else 2 if l in ref.novel else 0 for l in ref.labels]
    assert [i for i, v in enumerate(indicator) if v == 1] == sorted(golden["base_ids"])
    assert [i for i, v in enumerate(indicator) if v == 0] == sorted(golden["excluded_ids"])


def test_lvis_names_are_cleaned_by_the_reference_rule():
    data = json.loads(COCO_TEXTS_FILE.read_text())["lvis_name_cleaning"]
    for example in data["examples"]:
        assert split_label(example["before"]) == example["after"], example
    for name, texts in data["names_split_into_several_texts"].items():
        assert split_label(name) == texts


def test_lvis_vocabulary_base_is_common_and_frequent_and_fixes_mmdets_typo():
    cats = [{"id": 3, "name": "bow_(weapon)", "frequency": "r"}, {"id": 1, "name": "aerosol_can", "frequency": "c"},
            {"id": 2, "name": "speaker_(stero_equipment)", "frequency": "f"},
            {"id": 4, "name": "tape_(sticky_cloth_or_paper)", "frequency": "f"}]
    ref = lvis_reference_vocabulary(cats)
    assert ref.labels == ("aerosol_can", "speaker_(stero_equipment)", "bow_(weapon)", "tape_(sticky_cloth_or_paper)")
    assert ref.base == ("aerosol_can", "speaker_(stero_equipment)", "tape_(sticky_cloth_or_paper)")
    assert ref.novel == ("bow_(weapon)",) and ref.excluded == ()
    assert ref.texts["speaker_(stero_equipment)"] == ["speaker (stereo equipment)"]
    assert ref.texts["tape_(sticky_cloth_or_paper)"] == ["tape (sticky cloth", "paper)"]


def test_vocabulary_from_exact_texts_pads_with_the_first_and_marks_exclusions(tmp_path):
    torch.manual_seed(0)
    encoder = TextEncoder.from_config(ovsam.get_config("tiny")).eval()
    builder = VocabularyBuilder(encoder, cache_dir=tmp_path)
    ref = coco_reference_vocabulary()
    labels = ["person", "remote", "orange", "toaster"]
    vocab = builder.build(labels, texts=ref.texts, base_labels=ref.base, excluded_labels=ref.excluded)
    assert vocab.synonyms[1] == ["tv remote", "remote control"] and vocab.synonyms[2] == ["orange fruit"]
    assert vocab.embeddings.shape[1] == 17
    assert torch.equal(vocab.embeddings[2, 5], vocab.embeddings[2, 0])  # padded by the first text
    assert vocab.excluded.tolist() == [l in ref.excluded for l in labels]
    assert vocab.is_base.tolist() == [l in ref.base for l in labels]
    assert vocab.subset(["toaster", "person"]).excluded.tolist() == [("toaster" in ref.excluded), False]
    with pytest.raises(ValueError, match="excluded"):
        builder.build(["hair drier"], texts=ref.texts, excluded_labels=["hair drier"])
