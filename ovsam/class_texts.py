"""Class texts of the reference's evaluation vocabularies: COCO's hand-written synonyms and split, LVIS's name rule.

The reference embeds one prototype per text: for COCO its own synonym lists (e.g. "tv remote", "remote control"
for `remote`; 173 texts for 80 classes), for LVIS each class name cleaned by `split_label`. The COCO data is
`data/coco_class_texts.json` (read from HarborYuan/ovsam @137d2c2; see data/README.md).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

from .vocabulary import split_label

COCO_TEXTS_FILE = Path(__file__).parent / "data" / "coco_class_texts.json"
# mmdet's LVISV1Dataset names, whose texts the reference embedded, fix one typo of the LVIS annotation files.
LVIS_NAME_FIXES = {"speaker_(stero_equipment)": "speaker_(stereo_equipment)"}
LVIS_BASE_FREQUENCIES = ("c", "f")  # common + frequent = the reference's 866 base classes; rare (337) are novel


@dataclass(frozen=True)
class ReferenceVocabulary:
    """What the reference classifies against: labels in class order, the texts embedded for each, its split."""

    labels: Tuple[str, ...]
    texts: Dict[str, List[str]]
    base: Tuple[str, ...]
    excluded: Tuple[str, ...] = ()  # scored -1000 after the fusion (COCO: the 15 classes in neither split)

    @property
    def novel(self) -> Tuple[str, ...]:
        skip = set(self.base) | set(self.excluded)
        return tuple(l for l in self.labels if l not in skip)


@lru_cache(maxsize=1)
def _coco_data() -> dict:
    return json.loads(COCO_TEXTS_FILE.read_text(encoding="utf-8"))["coco"]


def coco_reference_vocabulary() -> ReferenceVocabulary:
    """COCO's 80 classes with the reference's synonym texts, 48 base, 17 novel and 15 excluded classes."""
    data = _coco_data()
    split = data["split"]
    return ReferenceVocabulary(
        labels=tuple(data["order"]),
        texts={k: list(v) for k, v in data["texts"].items()},
        base=tuple(split["base_48"]),
        excluded=tuple(split["excluded_15"]),
    )


def lvis_reference_vocabulary(categories: Sequence[Mapping]) -> ReferenceVocabulary:
    """LVIS v1 categories (the annotation file's `categories`: name, frequency r/c/f) as the reference uses them:
    texts by `split_label`, common and frequent classes base, rare classes novel (CLIP weight beta on them)."""
    ordered = sorted(categories, key=lambda c: c["id"])
    labels = tuple(c["name"] for c in ordered)
    base = tuple(c["name"] for c in ordered if c.get("frequency") in LVIS_BASE_FREQUENCIES)
    return ReferenceVocabulary(labels=labels, texts={l: split_label(LVIS_NAME_FIXES.get(l, l)) for l in labels},
                               base=base)
