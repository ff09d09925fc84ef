"""`finetune(...)`: CLIP2SAM fine-tuning of the head (the paper's second stage) from a base model.

Frozen: CLIP trunk, SAM2CLIP neck, prompt encoder (and the dead `label_mlp`). Trained: the mask
decoder, label token, FPN and roi_conv. This module prepares a run (data, base model, classifier, split),
hands it to the loop (`training.engine`) and writes the artifact the backend serves as is (weights,
configuration, vocabulary, provenance, validation metrics). The trainable step and its losses live in
`training.train_step`, the classifier in `training.classifier`, the command line in `training.finetune_cli`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ovsam.artifact import ModelArtifact, save_artifact
from ovsam.model import OVSAM
from ovsam.vocabulary import Vocabulary
from training.classifier import (classifier_summary, classifier_vocabulary, reference_classifier, trained_classifier,
                                 training_labels)
from training.dataset import TrainingData, load_training_data, make_image_source, read_label_config
from training.distributed import cleanup_distributed, init_distributed
from training.engine import FinetuneRun, ProgressFn, TrainingInputs
from training.finetune_config import FinetuneConfig
from training.optim import seed_everything
from training.provenance import finetune_provenance, make_version


@dataclass
class FinetuneResult:
    artifact: Optional[Path]
    version: str
    metrics: Dict[str, Any]
    provenance: Dict[str, Any]
    history: List[Dict[str, float]] = field(default_factory=list)
    model: Optional[OVSAM] = None
    vocabulary: Optional[Vocabulary] = None
    eval_samples: List[Any] = field(default_factory=list)


def finetune(
    cfg: FinetuneConfig,
    data: Optional[TrainingData] = None,
    base: Optional[ModelArtifact] = None,
    images: Any = None,
    on_progress: Optional[ProgressFn] = None,
    save: bool = True,
) -> FinetuneResult:
    """Train, evaluate on the validation split, and (rank 0, `save`) write the artifact.

    `data`, `base` and `images` may be given directly (the backend's pipeline does); otherwise they are
    read from `cfg.data`, `cfg.base` and the data file's folder.
    """
    run = start_run(cfg, data, base, images, on_progress)
    run.resume()
    before = run.evaluate() if cfg.eval_before and run.step == 0 else None
    if cfg.fit_label_embeddings and run.step == 0:  # a resumed run (step > 0) restored its fitted rows
        run.fit_labels()
    run.train()
    result = finish(run, save, before)
    cleanup_distributed()  # no barrier: other ranks need not wait for rank 0's evaluation
    return result


def start_run(cfg: FinetuneConfig, data: Optional[TrainingData] = None, base: Optional[ModelArtifact] = None,
              images: Any = None, on_progress: Optional[ProgressFn] = None) -> FinetuneRun:
    """The process group, the seeds, the prepared inputs and the loop's state, in the order resume relies on."""
    info = init_distributed(cfg.device)
    seed_everything(cfg.seed)
    return FinetuneRun(cfg, info, prepare_inputs(cfg, info.device, data, base, images), on_progress)


def prepare_inputs(cfg: FinetuneConfig, device: Any, data: Optional[TrainingData], base: Optional[ModelArtifact],
                   images: Any) -> TrainingInputs:
    """Data (read from `cfg` unless given), the base model on `device` made ready to train, its classifier, the split."""
    from training.vocab_cli import load_model_any

    reference = reference_classifier(cfg)
    if data is None:
        if not cfg.data:
            raise ValueError("no training data: give --data")
        data = load_training_data(cfg.data, read_label_config(cfg.label_config), training_labels(cfg, reference),
                                  cfg.image_root)
    if not data.labels:
        raise ValueError("no labels: give a label config or --labels, or data with labelled regions")
    val_data = load_training_data(cfg.val_data, labels=data.labels) if cfg.val_data else None
    roots = [r for r in (data.image_root, val_data.image_root if val_data else None) if r is not None]
    images = images or make_image_source(roots)
    base = base or load_model_any(cfg.base, device="cpu")
    model = prepare_model(base.model.to(device), cfg)
    vocab = trained_classifier(classifier_vocabulary(base, cfg, data, reference), data.labels)
    train, val = split_data(data, cfg, val_data)
    train = usable(train, data.labels)
    if not train:
        raise ValueError(f"no training image has a label of the vocabulary {data.labels}")
    return TrainingInputs(data, images, base, model, vocab, train, val)


def prepare_model(model: OVSAM, cfg: FinetuneConfig) -> OVSAM:
    """The run's changes to the base model's configuration, and which of its parts train."""
    if cfg.head_mask_pooling is not None:
        model.cfg = model.cfg.replace(head_mask_pooling=cfg.head_mask_pooling)
    if cfg.decoder_high_res and not model.cfg.decoder_high_res:
        model.cfg = model.cfg.replace(decoder_high_res=True)
        model.head.add_high_res_projections(model.cfg)
    if cfg.image_size is not None:
        model.set_image_size(cfg.image_size)
    if cfg.train_all:
        model.trunk.requires_grad_(True)
        model.neck.requires_grad_(True)
        model.head.label_mlp.requires_grad_(False)
    else:
        check_frozen(model)
    if not cfg.train_mask_decoder:
        model.head.mask_decoder.requires_grad_(False)
        # The label token is one of the decoder's queries: it shapes the masks only (the reference multiplies the
        # label branch's output by 0, docs/REFERENCE_NOTES.md B3), so it stays too. (With the reference's
        # weight-decay groups it would otherwise shrink under AdamW's decay.)
        model.head.label_token.requires_grad_(False)
    if not cfg.train_fpn:
        model.head.fpn.requires_grad_(False)
    return model


def check_frozen(model: OVSAM) -> None:
    """The recipe's split between frozen and trained parts, asserted rather than assumed."""
    for name in ("trunk", "neck", "prompt_encoder"):
        if any(p.requires_grad for p in getattr(model, name).parameters()):
            raise RuntimeError(f"{name} must be frozen for CLIP2SAM fine-tuning")
    model.head.label_mlp.requires_grad_(False)  # dead branch (docs/REFERENCE_NOTES.md B3): never trained


def split_data(data: TrainingData, cfg: FinetuneConfig, val_data: Optional[TrainingData] = None) -> Tuple[list, list]:
    """(train, val): a separate validation file, else a stable split by task (`split_by_task`)."""
    from training.data.split import split_by_task

    if val_data is not None:
        return list(data.samples), list(val_data.samples)
    train, val = split_by_task(data.samples, cfg.val_fraction, cfg.split_seed)
    if not train:
        raise ValueError("no training images: every annotated task went to validation")
    return train, val


def usable(samples: list, labels: Sequence[str]) -> list:
    """The samples with at least one instance of a training label."""
    known = set(labels)
    return [s for s in samples if any(i.label in known for i in s.instances)]


def finish(run: FinetuneRun, save: bool, before: Optional[Dict[str, Any]]) -> FinetuneResult:
    """Rank 0: validation metrics, provenance and (with `save`) the artifact and metrics.json; every rank: the result."""
    cfg, history = run.cfg, run.history
    version = cfg.version or make_version(run.base.version)
    metrics: Dict[str, Any] = {}
    provenance: Dict[str, Any] = {}
    artifact_path: Optional[Path] = None
    if run.info.is_main:
        metrics = {"eval_split": "val" if run.val_samples else "train",
                   "train_loss_first": history[0]["loss"] if history else None,
                   "train_loss_last": history[-1]["loss"] if history else None}
        if cfg.eval_prompts:
            run.notify({"event": "evaluate", "images": len(run.eval_samples)})
            metrics["val"] = run.evaluate()
        if before is not None:
            metrics["before"] = before
        provenance = finetune_provenance(cfg, run.base, run.data, run.info, len(run.train_samples),
                                         len(run.val_samples), run.step)
        if run.label_fit is not None:
            provenance["label_fit"] = run.label_fit.summary()
        if cfg.classifier_vocabulary or cfg.classifier_labels:
            provenance["classifier"] = classifier_summary(run.vocab, cfg)
        if save:
            artifact_path = Path(cfg.artifact) if cfg.artifact else run.out_dir / "model.safetensors"
            save_artifact(artifact_path, run.model, run.vocab, version, provenance, metrics,
                          text_encoder=run.base.text_encoder)
            (run.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str), encoding="utf-8")
        run.notify({"event": "done", "version": version, "artifact": str(artifact_path) if artifact_path else None})
    run.model.eval()
    return FinetuneResult(artifact_path, version, metrics, provenance, history, run.model, run.vocab,
                          run.eval_samples)
