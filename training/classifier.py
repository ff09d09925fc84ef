"""The classifier a fine-tuning run trains the head against: which labels, in which order, which of them base.

Default: the training labels. A larger classifier (`FinetuneConfig.classifier_vocabulary`: the reference's COCO
or LVIS classes; `classifier_labels`: a label list) keeps other classes in the softmax as negatives, as the
reference's CLIP2SAM training keeps all 80 COCO classes while its targets are the 48 base classes.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

if TYPE_CHECKING:
    from ovsam.artifact import ModelArtifact
    from ovsam.class_texts import ReferenceVocabulary
    from ovsam.vocabulary import Vocabulary
    from training.dataset import TrainingData
    from training.finetune_config import FinetuneConfig


def reference_classifier(cfg: FinetuneConfig) -> Optional[ReferenceVocabulary]:
    """The reference vocabulary `--classifier-vocabulary` names (LVIS's classes are read from the --data file)."""
    if cfg.classifier_vocabulary is None:
        return None
    from training.evaluate import reference_classes

    return reference_classes(cfg.classifier_vocabulary, cfg.data)


def training_labels(cfg: FinetuneConfig, reference: Optional[ReferenceVocabulary]) -> Optional[List[str]]:
    """`--labels`; else, with a reference classifier and no label config, its base classes: the reference trains on
    those alone (COCO's 48 of `sub_split='48_17'`, LVIS's common and frequent), so its own files can be given as is."""
    if cfg.labels or cfg.label_config or reference is None:
        return cfg.labels
    return list(reference.base)


def check_classifier(labels: Sequence[str], classifier: Sequence[str], excluded: Sequence[str] = ()) -> None:
    """Every training label must be a class of the classifier that can be predicted (targets map by name)."""
    known, never = set(classifier), set(excluded)
    missing = [l for l in labels if l not in known]
    if missing:
        raise ValueError(f"training label(s) {missing[:10]} not in the classifier vocabulary ({len(known)} labels); "
                         "the classifier must hold every annotated label under the same name")
    dropped = [l for l in labels if l in never]
    if dropped:
        raise ValueError(f"training label(s) {dropped[:10]} are excluded classes of the classifier (never predicted); "
                         "leave them out with --labels")


def classifier_vocabulary(artifact: ModelArtifact, cfg: FinetuneConfig, data: TrainingData,
                          reference: Optional[ReferenceVocabulary] = None) -> Vocabulary:
    """The classifier's labels as `artifact` recognises them (`ovsam.vocabulary.resolve_vocabulary`, the backend's
    rule): the gate scores the serving model with exactly the base/novel weighting it is served with.

    Default: the training labels. With a larger classifier (`cfg.classifier_vocabulary` or `cfg.classifier_labels`):
    its labels in its order. The loss keeps novel and excluded classes in the softmax as negatives, as the reference's
    CLIP2SAM training keeps all 80 COCO classes plus background in its classifier while its targets are the 48 base
    classes; COCO's 15 excluded classes are scored -1000 only after the fusion, at inference, as in the reference's
    evaluation. The new model's own classifier is `trained_classifier` of this one.
    """
    from ovsam.vocabulary import artifact_vocabulary

    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    if reference is not None:
        check_classifier(data.labels, reference.labels, reference.excluded)
        return artifact_vocabulary(artifact, reference.labels, cache_dir=cache, texts=reference.texts,
                                   excluded_labels=reference.excluded)
    if cfg.classifier_labels:
        check_classifier(data.labels, cfg.classifier_labels)
    return artifact_vocabulary(artifact, cfg.classifier_labels or data.labels, data.synonyms, cache_dir=cache)


def trained_classifier(classifier: Vocabulary, labels: Sequence[str]) -> Vocabulary:
    """The classifier as the fine-tuned artifact keeps it: base iff trained on (`labels`), the others novel (so a
    served model fuses them with CLIP weight beta and can name classes nobody annotated)."""
    return classifier.with_base(labels)


def classifier_summary(vocab: Vocabulary, cfg: FinetuneConfig) -> Dict[str, Any]:
    """How the head was trained against a larger classifier (the artifact's provenance)."""
    return {"source": cfg.classifier_vocabulary or "labels", "labels": len(vocab),
            "base": int(vocab.is_base.sum()), "excluded": int(vocab.excluded.sum()),
            "novel": int((~vocab.is_base & ~vocab.excluded).sum())}
