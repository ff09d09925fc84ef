"""Vocabularies for training and evaluation, and `python -m training vocab`.

Fine-tuning, evaluation and the gate must classify against the same text prototypes the backend will
use for a project, so they all build them here: from the model's own text tower, with the project's
labels and `predicted_values` synonyms, reusing the artifact's stored embeddings when they match.

torch and the model code are imported inside the functions that use them, so that the command's
`--help`, argument errors and `split_labels` (the other commands' parsers use it) stay instant.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

if TYPE_CHECKING:
    import torch

    from ovsam.artifact import ModelArtifact
    from ovsam.class_texts import ReferenceVocabulary


def load_model_any(path: str | Path, device: str | torch.device = "cpu",
                   reference: Optional[ReferenceVocabulary] = None) -> ModelArtifact:
    """A model artifact, or a directory of the official weights (through `ovsam.checkpoint.load_model`; `reference`:
    the benchmark vocabulary official weights store, with the split they were trained on)."""
    from ovsam.checkpoint import load_model

    return load_model(path, device=device, reference=reference)


def split_labels(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    return [s.strip() for s in text.split(",") if s.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training vocab",
                                description="Text embeddings of a label set with a model's text tower (cached on disk).")
    p.add_argument("--model", required=True, help="model artifact (or official weights directory)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", help="comma-separated labels")
    src.add_argument("--label-config", help="Label Studio label config (XML file); its labels and predicted_values")
    p.add_argument("--cache-dir", type=Path, help="embedding cache (default $OVSAM_CACHE_DIR/vocab or ~/.cache/ovsam/vocab)")
    p.add_argument("--out", type=Path, help="write {labels, synonyms, embeddings [K,P,D], is_base} with torch.save "
                                                  "(is_base: the labels the model was trained on)")
    p.add_argument("--device", default="cpu")
    return p


def main_vocab(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from ovsam.vocabulary import artifact_vocabulary
    from training.dataset import labels_from_config, read_label_config

    artifact = load_model_any(args.model, device="cpu")
    if args.label_config:
        labels, synonyms, _ = labels_from_config(read_label_config(args.label_config))
    else:
        labels, synonyms = split_labels(args.labels), {}
    if not labels:
        print("error: no labels given", file=sys.stderr)
        return 2
    encoder = artifact.get_text_encoder().to(args.device)
    vocab = artifact_vocabulary(artifact, labels, synonyms, cache_dir=args.cache_dir)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"labels": vocab.labels, "synonyms": vocab.synonyms, "embeddings": vocab.embeddings.cpu(),
                    "is_base": vocab.is_base.cpu(), "text_model": encoder.model_name}, args.out)
    print(json.dumps({"labels": vocab.labels, "shape": list(vocab.embeddings.shape), "text_model": encoder.model_name,
                      "out": str(args.out) if args.out else None}))
    return 0
