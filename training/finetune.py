"""`python -m training finetune`: CLIP2SAM fine-tuning of the head (spec §2.2) from a base model.

Frozen: CLIP trunk, SAM2CLIP neck, prompt encoder (and the dead `label_mlp`). Trained: the mask
decoder, label token, FPN and roi_conv. The same command runs on 1 CPU, 1 GPU, or under `torchrun`
on many GPUs/nodes; a run killed at any point resumes from its last checkpoint with `--resume` and
reaches the same weights as an uninterrupted run. The result is a model artifact the backend serves
as is (weights, configuration, vocabulary, provenance, validation metrics).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from ovsam.artifact import ModelArtifact, save_artifact
from ovsam.class_texts import ReferenceVocabulary
from ovsam.head import cosine_logits
from ovsam.model import OVSAM
from ovsam.roi import boxes_to_rois, mask_occupancy
from ovsam.transforms import input_frame_mask_logits
from ovsam.vocabulary import Vocabulary, VocabularyBuilder
from training import losses as L
from training.dataset import (CLIP2SAMDataset, ExampleConfig, FeatureStore, TrainingData, collate_examples,
                              load_training_data, make_image_source, read_label_config)
from training.distributed import (DistInfo, RunLogger, ShardedSampler, all_reduce_sum, barrier, cleanup_distributed,
                                  init_distributed, wrap_ddp)
from training.data.prompts import center_point
from training.metrics import mask_iou
from training.label_fit import SERVED_MIN_IOU, LabelFit, fit_label_embeddings, unique_instances
from training.optim import (NO_DECAY_RULES, build_adamw, default_warmup, load_training_state, param_groups, rng_states,
                            save_training_state, seed_everything, set_rng_states, warmup_multistep)
# The configuration and the command line live in torch-free modules (a fast `--help`); still importable from here.
from training.finetune_cli import build_parser, config_from_args, main_finetune  # noqa: F401
from training.finetune_config import REFERENCE_VOCABULARIES, FinetuneConfig  # noqa: F401

ProgressFn = Callable[[Dict[str, Any]], None]
CHECKPOINT = "checkpoints/last.pt"


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


# ------------------------------------------------------------------------------------------- model


class CLIP2SAMTrainStep(nn.Module):
    """The trainable forward: FPN + mask decoder + RoI classifier on top of frozen image features.

    DDP wraps this module. Every trainable parameter gets a gradient each step (a zero term touches
    those a batch does not use, e.g. the P5 conv when no RoI is large), so DDP needs no unused-parameter
    search and 1 and N processes make identical updates.
    """

    def __init__(self, model: OVSAM, text_embeddings: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("text_embeddings", text_embeddings.float(), persistent=False)
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self.image_side_trains = any(p.requires_grad for p in (*model.trunk.parameters(), *model.neck.parameters()))
        self.decoder_trains = any(p.requires_grad for p in model.head.mask_decoder.parameters())

    def forward(self, batch: Dict[str, Any], feats: Optional[List[torch.Tensor]] = None,
                embedding: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        m = self.model
        if feats is None:
            # Frozen trunk and neck (the recipe) build no graph; pretraining (`train_all`) trains them too.
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.image_side_trains):
                feats = m.trunk(batch["images"])
                embedding = m.neck(feats)
        logits = cosine_logits(self.roi_embeddings(batch, m.head.pyramid(feats)), self.text_embeddings, m.head.logit_scale)
        image_index = batch["image_index"]
        dec = torch.nonzero(batch["has_mask"], as_tuple=True)[0]  # box-only instances train only the classifier
        if not self.decoder_trains:
            dec = dec[:0]  # no mask loss can change anything: skip decoding
        low_res = embedding.new_zeros(0, 1, m.cfg.low_res_size, m.cfg.low_res_size)
        if dec.numel():
            sparse, dense = self.encode_prompts(batch, dec)
            low_res = m.decode(embedding, sparse, dense, image_index[dec], m.head.high_res_features(feats))
        zero = sum(p.sum() for p in self._trainable) * 0.0
        return {"logits": logits, "low_res": low_res, "decoded": dec, "zero": zero}

    def roi_embeddings(self, batch: Dict[str, Any], pyramid: List[torch.Tensor]) -> torch.Tensor:
        """[N, D] head embeddings of the batch's annotated objects (their GT boxes, and masks when pooled by mask)."""
        m = self.model
        rois = boxes_to_rois(batch["boxes"].float(), batch["image_index"])
        weights = None
        if m.cfg.head_mask_pooling:  # GT masks (in the input frame); box-only instances fall back to the box
            weights = mask_occupancy(batch["masks"], rois, m.head.roi_size, 1.0, batch["mask_index"])
        return m.head.roi_embeddings(pyramid, rois, weights)

    @torch.no_grad()
    def served_embeddings(self, batch: Dict[str, Any], pyramid: List[torch.Tensor], embedding: torch.Tensor,
                          high_res: Optional[List[torch.Tensor]], keep: List[int],
                          min_iou: float = SERVED_MIN_IOU) -> Tuple[torch.Tensor, torch.Tensor]:
        """Head embeddings of what the served model outlines for an annotator's prompts, with their labels.

        For each annotated object (prompt positions `keep`, one per object) with a mask: a click at its centre
        (`center_point`, the evaluation's click) and its box go through the mask decoder, and the head embeds
        the predicted masks as `recognise` does (clicks first, then boxes). An outline whose `mask_iou` with the
        annotation is under `min_iou` is dropped: its embedding shows another object (a click on a cross that
        outlined the ring behind it) under this label.
        """
        m = self.model
        keep_t = torch.as_tensor(keep, dtype=torch.long, device=batch["labels"].device)
        keep_t = keep_t[batch["has_mask"][keep_t]]
        if keep_t.numel() == 0:  # box-only annotations: nothing to click at
            return embedding.new_zeros(0, m.cfg.clip_embed_dim), batch["labels"][:0]
        labels, image_index = batch["labels"][keep_t], batch["image_index"][keep_t]
        gt = batch["masks"][batch["mask_index"][keep_t]].bool().cpu().numpy()
        points = torch.tensor([center_point(g) for g in gt], dtype=torch.float32, device=embedding.device).view(-1, 1, 2)
        prompts = (m.encode_prompts(points=points, point_labels=torch.ones_like(points[..., 0], dtype=torch.long)),
                   m.encode_prompts(boxes=batch["boxes"][keep_t].float()))
        size, h, w = m.cfg.image_size, gt.shape[1], gt.shape[2]
        out, out_labels = [], []
        for sparse, dense in prompts:
            low_res = m.decode(embedding, sparse, dense, image_index, high_res).float()
            pred = (input_frame_mask_logits(low_res, size, h, w)[:, 0] > 0).cpu().numpy()
            good = torch.tensor([mask_iou(g, p) >= min_iou for g, p in zip(gt, pred)], dtype=torch.bool, device=labels.device)
            out.append(m.served_roi_embeddings(pyramid, low_res, image_index)[good])
            out_labels.append(labels[good])
        return torch.cat(out), torch.cat(out_labels)

    def set_text_embeddings(self, embeddings: torch.Tensor) -> None:
        self.text_embeddings.copy_(embeddings.float())

    @torch.no_grad()
    def encode_prompts(self, batch: Dict[str, Any], dec: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Box prompts (GT box) and single positive point prompts, back in the order of `dec`."""
        m = self.model
        is_box = batch["is_box"][dec]
        sparse = dense = None
        for sel, kind in ((is_box, "box"), (~is_box, "point")):
            idx = torch.nonzero(sel, as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            rows = dec[idx]
            if kind == "box":
                s, d = m.encode_prompts(boxes=batch["boxes"][rows].float())
            else:
                pts = batch["points"][rows].float().unsqueeze(1)
                s, d = m.encode_prompts(points=pts, point_labels=torch.ones_like(pts[..., 0], dtype=torch.long))
            if sparse is None:
                sparse = s.new_zeros(len(dec), *s.shape[1:])
                dense = d.new_zeros(len(dec), *d.shape[1:])
            sparse[idx], dense[idx] = s, d
        return sparse, dense


def compute_losses(out: Dict[str, torch.Tensor], batch: Dict[str, Any], cfg: L.LossConfig, image_size: int,
                   world_size: int) -> Dict[str, torch.Tensor]:
    """Weighted CE + BCE + Dice; each divided by the mean count over ranks (= the 1-process mean)."""
    dev = out["logits"].device
    counts = all_reduce_sum(torch.tensor([float(out["logits"].shape[0]), float(out["decoded"].numel())], device=dev))
    n_cls = max(1.0, float(counts[0]) / world_size)
    n_mask = max(1.0, float(counts[1]) / world_size)
    losses = {"cls": cfg.cls_weight * L.classification_loss(out["logits"], batch["labels"], cfg.background_weight, n_cls)}
    low_res = out["low_res"]
    if low_res.shape[0]:
        coords = L.uncertain_point_coords(low_res, batch["masked_counts"], batch["seeds"], cfg.num_points,
                                          cfg.oversample, cfg.importance)
        pred = L.point_sample(low_res.float(), coords)[:, 0]
        target = L.sample_binary_masks(batch["masks"], batch["mask_index"][out["decoded"]], coords, image_size)
        ml = L.mask_losses(pred, target, n_mask)
        losses["mask"] = cfg.mask_weight * ml["mask"]
        losses["dice"] = cfg.dice_weight * ml["dice"]
    else:
        losses["mask"] = losses["dice"] = out["logits"].new_zeros(())
    losses["loss"] = losses["cls"] + losses["mask"] + losses["dice"] + out["zero"]
    return losses


def to_device(batch: Dict[str, Any], dev: torch.device) -> Dict[str, Any]:
    return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------------ setup


def make_version(base_version: str, when: Optional[datetime] = None) -> str:
    """`<base>-ft-<UTC timestamp>`; a base that is itself fine-tuned keeps only its root name."""
    root = re.sub(r"-ft-\d{8}T\d{6}Z(-\d+)?$", "", base_version)
    stamp = (when or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    return f"{root}-ft-{stamp}"


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def check_frozen(model: OVSAM) -> None:
    """The recipe's split between frozen and trained parts, asserted rather than assumed."""
    for name in ("trunk", "neck", "prompt_encoder"):
        if any(p.requires_grad for p in getattr(model, name).parameters()):
            raise RuntimeError(f"{name} must be frozen for CLIP2SAM fine-tuning")
    model.head.label_mlp.requires_grad_(False)  # dead branch (bug B3): never trained


def split_data(data: TrainingData, cfg: FinetuneConfig, val_data: Optional[TrainingData] = None) -> Tuple[list, list]:
    """(train, val): a separate validation file, else a stable split by task (`split_by_task`)."""
    from training.data.split import split_by_task

    if val_data is not None:
        return list(data.samples), list(val_data.samples)
    train, val = split_by_task(data.samples, cfg.val_fraction, cfg.split_seed)
    if not train:
        raise ValueError("no training images: every annotated task went to validation")
    return train, val


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
    """The vocabulary the head's logits are computed against during training, validation and the gate, and the one
    the artifact keeps for serving.

    Default: the training labels, all base. With a larger classifier (`cfg.classifier_vocabulary` or
    `cfg.classifier_labels`): its labels in its order, the training labels base and the others novel (so a served
    model fuses them with CLIP weight beta and can name classes nobody annotated). The loss keeps novel and excluded
    classes in the softmax as negatives, as the reference's CLIP2SAM training keeps all 80 COCO classes plus
    background in its classifier while its targets are the 48 base classes; COCO's 15 excluded classes are scored
    -1000 only after the fusion, at inference, as in the reference's evaluation.
    """
    from training.vocab_cli import project_vocabulary

    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    if reference is not None:
        check_classifier(data.labels, reference.labels, reference.excluded)
        builder = VocabularyBuilder(artifact.get_text_encoder(), cache)
        return builder.build(list(reference.labels), texts=reference.texts, base_labels=data.labels,
                             excluded_labels=list(reference.excluded))
    if cfg.classifier_labels:
        check_classifier(data.labels, cfg.classifier_labels)
        return project_vocabulary(artifact, cfg.classifier_labels, data.synonyms, base_labels=data.labels,
                                  cache_dir=cache)
    return project_vocabulary(artifact, data.labels, data.synonyms, cache_dir=cache)


def usable(samples: list, labels: Sequence[str]) -> list:
    known = set(labels)
    return [s for s in samples if any(i.label in known for i in s.instances)]


# ------------------------------------------------------------------------------------------ train


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
    run = _Run(cfg, on_progress)
    run.setup(data, base, images)
    run.resume()
    before = run.evaluate() if cfg.eval_before and run.step == 0 else None
    if cfg.fit_label_embeddings and run.step == 0:  # a resumed run (step > 0) restored its fitted rows
        run.fit_labels()
    run.train()
    result = run.finish(save, before)
    cleanup_distributed()  # no barrier: other ranks need not wait for rank 0's evaluation
    return result


class _Run:
    """The state of one fine-tuning run, split into the steps `finetune` takes."""

    def __init__(self, cfg: FinetuneConfig, on_progress: Optional[ProgressFn]) -> None:
        self.cfg = cfg
        self.info = init_distributed(cfg.device)
        self.dev = self.info.device
        self.out_dir = Path(cfg.out)
        self.notify = on_progress or (lambda event: None)
        self.epoch, self.step, self.skip_micro = 0, 0, 0
        self.history: List[Dict[str, float]] = []
        seed_everything(cfg.seed)

    # ---- data, model, optimiser ---------------------------------------------------------------
    def setup(self, data: Optional[TrainingData], base: Optional[ModelArtifact], images: Any) -> None:
        from training.vocab_cli import load_model_any

        cfg = self.cfg
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
        self.data, self.images = data, images or make_image_source(roots)
        self.base = base or load_model_any(cfg.base, device="cpu")
        self.model = model = self.base.model.to(self.dev)
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
            # The label token is one of the decoder's queries: it shapes the masks only (bug B3), so it stays too.
            # (With the reference's weight-decay groups it would otherwise shrink under AdamW's decay.)
            model.head.label_token.requires_grad_(False)
        if not cfg.train_fpn:
            model.head.fpn.requires_grad_(False)
        self.vocab = classifier_vocabulary(self.base, cfg, data, reference)
        train, self.val_samples = split_data(data, cfg, val_data)
        self.train_samples = usable(train, data.labels)
        if not self.train_samples:
            raise ValueError(f"no training image has a label of the vocabulary {data.labels}")
        self.image_size = model.cfg.image_size
        self.loss_cfg = cfg.loss_config(self.image_size)
        self.dataset = CLIP2SAMDataset(
            self.train_samples, {l: i for i, l in enumerate(self.vocab.labels)}, self.images,
            ExampleConfig(self.image_size, cfg.augment, tuple(cfg.ratio_range), 0.5, cfg.num_proposals,
                          cfg.num_box_prompts, None, cfg.seed), model.cfg)
        self.sampler = ShardedSampler(len(self.dataset), self.info.world_size, self.info.rank, shuffle=True, seed=cfg.seed)
        self.micro_per_epoch = math.ceil(self.sampler.per_rank / cfg.batch_size)
        self.total_steps = math.ceil(self.micro_per_epoch / cfg.grad_accum) * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.step_module = CLIP2SAMTrainStep(model, self.vocab.embeddings).to(self.dev)
        self.store = FeatureStore() if cfg.cache_features else None
        self.label_fit: Optional[LabelFit] = None
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.trained_modules = ("trunk", "neck", "head") if cfg.train_all else ("head",)
        if cfg.weight_decay_groups not in NO_DECAY_RULES:
            raise ValueError(f"weight_decay_groups must be one of {sorted(NO_DECAY_RULES)}, got {cfg.weight_decay_groups!r}")
        self.optimizer = build_adamw(param_groups(model, cfg.weight_decay, NO_DECAY_RULES[cfg.weight_decay_groups]), cfg.lr)
        warmup = default_warmup(self.total_steps, cfg.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_multistep(self.total_steps, warmup, cfg.milestones, cfg.gamma))
        self.wrapped: nn.Module = self.step_module
        if self.info.distributed:
            self.wrapped = wrap_ddp(self.step_module, self.dev)

    # ---- checkpoints ----------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    def resume(self) -> None:
        path, main = self.ckpt_path, self.info.is_main
        if not self.cfg.resume:
            return
        if not path.exists():
            if main:
                print(f"no checkpoint at {path}; starting from scratch", file=sys.stderr)
            return
        state = load_training_state(path)
        if state.get("labels") != self.vocab.labels:
            raise ValueError(f"{path} was trained on labels {state.get('labels')}, not {self.vocab.labels}; "
                             "use another --out to start afresh")
        _warn_changed(state.get("config", {}), self.cfg, self.info)
        for name, module_state in state["modules"].items():
            getattr(self.model, name).load_state_dict(module_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.skip_micro = state["epoch"], state["step"], state["micro"]
        if state.get("label_embeddings") is not None:
            self.use_vocabulary(self.vocab.with_embeddings(state["label_embeddings"]))
        self.history = state.get("history", [])
        set_rng_states(state["rng"])
        if main:
            print(f"resumed from {path}: epoch {self.epoch}, step {self.step}", file=sys.stderr)

    def checkpoint(self, epoch: int, micro: int) -> None:
        """Everything a resumed run needs to continue bit-identically (rank 0 writes it)."""
        if not self.info.is_main:
            return
        save_training_state(self.ckpt_path, {
            "modules": {name: getattr(self.model, name).state_dict() for name in self.trained_modules},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": epoch, "step": self.step, "micro": micro,
            "rng": rng_states(), "history": self.history, "config": dataclasses.asdict(self.cfg),
            "labels": self.vocab.labels,
            "label_embeddings": self.vocab.embeddings if self.cfg.fit_label_embeddings else None,
        })

    # ---- the label rows -------------------------------------------------------------------------
    def use_vocabulary(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self.step_module.set_text_embeddings(vocab.embeddings.to(self.dev))

    @torch.no_grad()
    def fit_labels(self) -> None:
        """Fit the annotated labels' rows to the (frozen, not yet trained) head's embeddings of their objects.

        Each object counts with its annotated outline and with what the served model outlines for a click at its
        centre and for its box (`served_embeddings`): at inference the head embeds predicted masks, which sit a
        little apart from annotated ones. On the loop benchmark's pool (38 tasks, 5 draws, demo-7) held-out click
        accuracy was 0.925 / 0.971 / 0.939 on data seeds 7 / 8 / 9 against 0.900 / 0.972 / 0.934 with the
        annotated outlines alone.

        Every process embeds all training images in the same order and fits the same rows, so no
        communication is needed and 1 and N processes train against identical rows.
        """
        was_training = self.model.training
        self.model.eval()
        annotated, objects, served, served_labels = [], [], [], []
        for index in range(len(self.dataset)):
            batch = to_device(collate_examples([self.dataset[index]]), self.dev)
            with self.autocast():
                if self.store is not None:
                    feats, embedding = self.store.get(self.model, batch["index"], batch["images"])
                else:
                    feats = self.model.trunk(batch["images"])
                    embedding = self.model.neck(feats)
                pyramid, high_res = self.model.head.pyramid(feats), self.model.head.high_res_features(feats)
                keep = unique_instances(batch["mask_index"])
                annotated.append(self.step_module.roi_embeddings(batch, pyramid)[keep].float().cpu())
                objects.append(batch["labels"][keep].cpu())
                views, labels = self.step_module.served_embeddings(batch, pyramid, embedding, high_res, keep)
                served.append(views.float().cpu())
                served_labels.append(labels.cpu())
        self.model.train(was_training)
        self.label_fit = fit_label_embeddings(self.vocab, torch.cat(annotated + served), torch.cat(objects + served_labels),
                                              objects=torch.cat(objects))
        self.use_vocabulary(self.label_fit.vocabulary)
        self.notify({"event": "fit_labels", **self.label_fit.summary()})
        if self.info.is_main and self.cfg.progress:
            print(f"fitted label embeddings: {self.label_fit.summary()}", file=sys.stderr)

    # ---- training -------------------------------------------------------------------------------
    def train(self) -> None:
        cfg, info = self.cfg, self.info
        logger = RunLogger(self.out_dir, self.total_steps, self.step, info.is_main, cfg.progress, cfg.tensorboard,
                           desc="finetune")
        store = self.store
        self.model.train()
        self.notify({"event": "start", "total_steps": self.total_steps, "step": self.step, "epochs": cfg.epochs,
                     "train_images": len(self.train_samples), "val_images": len(self.val_samples)})
        try:
            for epoch in range(self.epoch, cfg.epochs):
                if self.step >= self.total_steps:
                    break
                micro = self.train_epoch(epoch, store, logger)
                if micro < self.micro_per_epoch:  # stopped by max_steps: a later --resume continues this epoch
                    self.checkpoint(epoch, micro)
                    break
                self.checkpoint(epoch + 1, 0)
                self.notify({"event": "epoch_end", "epoch": epoch + 1, "epochs": cfg.epochs, "step": self.step})
        finally:
            logger.close()
        barrier()

    def train_epoch(self, epoch: int, store: Optional[FeatureStore], logger: RunLogger) -> int:
        """One epoch (or its remainder after a mid-epoch resume); returns the micro-batches consumed."""
        cfg, info = self.cfg, self.info
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, skip=self.skip_micro * cfg.batch_size)
        loader = DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=self.sampler, collate_fn=collate_examples,
                            num_workers=cfg.workers, pin_memory=self.dev.type == "cuda")
        micro, self.skip_micro = self.skip_micro, 0
        sums: Dict[str, float] = {}
        for batch in loader:
            group_start = (micro // cfg.grad_accum) * cfg.grad_accum
            group = min(cfg.grad_accum, self.micro_per_epoch - group_start)
            last = micro + 1 == group_start + group
            sync = contextlib.nullcontext() if (last or not info.distributed) else self.wrapped.no_sync()
            with sync:
                losses = self.forward_backward(to_device(batch, self.dev), store, group)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v / group
            micro += 1
            if not last:
                continue
            self.optimiser_step(epoch, sums, logger)
            sums = {}
            if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0 and micro < self.micro_per_epoch:
                self.checkpoint(epoch, micro)
            if self.step >= self.total_steps:
                break
        return micro

    def autocast(self) -> ContextManager[Any]:
        """bf16 autocast on CUDA unless --no-amp; nothing on CPU."""
        if self.cfg.amp and self.dev.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(self, batch: Dict[str, Any], store: Optional[FeatureStore], group: int) -> Dict[str, float]:
        with self.autocast():
            feats = emb = None
            if store is not None:
                feats, emb = store.get(self.model, batch["index"], batch["images"])
            out = self.wrapped(batch, feats, emb)
        losses = compute_losses(out, batch, self.loss_cfg, self.image_size, self.info.world_size)
        (losses["loss"] / group).backward()
        return {k: float(v.detach()) for k, v in losses.items()}

    def optimiser_step(self, epoch: int, sums: Dict[str, float], logger: RunLogger) -> None:
        grad_norm = _clip(self.trainable, self.cfg.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step += 1
        row = {"lr": lr, **_mean_over_ranks(sums, self.info, self.dev), "grad_norm": grad_norm}
        self.history.append({"step": self.step, "epoch": epoch, **row})
        logger.log(self.step, epoch, row)
        self.notify({"event": "step", "step": self.step, "total_steps": self.total_steps, "epoch": epoch, **row})

    # ---- evaluation and the artifact ------------------------------------------------------------
    @property
    def eval_samples(self) -> list:
        return self.val_samples or self.train_samples

    def evaluate(self) -> Optional[Dict[str, Any]]:
        """Rank 0 only: the spec's metric on the validation split (the training images when there is none)."""
        if not (self.cfg.eval_prompts and self.info.is_main):
            return None
        metrics = _evaluate(self.model, self.vocab, self.eval_samples, self.images, self.dev, self.cfg)
        self.model.train()
        return metrics

    def finish(self, save: bool, before: Optional[Dict[str, Any]]) -> FinetuneResult:
        cfg, history = self.cfg, self.history
        version = cfg.version or make_version(self.base.version)
        metrics: Dict[str, Any] = {}
        provenance: Dict[str, Any] = {}
        artifact_path: Optional[Path] = None
        if self.info.is_main:
            metrics = {"eval_split": "val" if self.val_samples else "train",
                       "train_loss_first": history[0]["loss"] if history else None,
                       "train_loss_last": history[-1]["loss"] if history else None}
            if cfg.eval_prompts:
                self.notify({"event": "evaluate", "images": len(self.eval_samples)})
                metrics["val"] = self.evaluate()
            if before is not None:
                metrics["before"] = before
            provenance = _provenance(cfg, self.base, self.data, self.info, len(self.train_samples),
                                     len(self.val_samples), self.step)
            if self.label_fit is not None:
                provenance["label_fit"] = self.label_fit.summary()
            if cfg.classifier_vocabulary or cfg.classifier_labels:
                provenance["classifier"] = classifier_summary(self.vocab, cfg)
            if save:
                artifact_path = Path(cfg.artifact) if cfg.artifact else self.out_dir / "model.safetensors"
                save_artifact(artifact_path, self.model, self.vocab, version, provenance, metrics,
                              text_encoder=self.base.text_encoder)
                (self.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str), encoding="utf-8")
            self.notify({"event": "done", "version": version, "artifact": str(artifact_path) if artifact_path else None})
        self.model.eval()
        return FinetuneResult(artifact_path, version, metrics, provenance, history, self.model, self.vocab,
                              self.eval_samples)


RESUME_KEYS = ("base", "epochs", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "milestones",
               "gamma", "max_norm", "num_points", "augment", "seed", "val_fraction", "split_seed", "head_mask_pooling",
               "decoder_high_res", "fit_label_embeddings", "image_size", "classifier_vocabulary", "classifier_labels")


def classifier_summary(vocab: Vocabulary, cfg: FinetuneConfig) -> Dict[str, Any]:
    """How the head was trained against a larger classifier (the artifact's provenance)."""
    return {"source": cfg.classifier_vocabulary or "labels", "labels": len(vocab),
            "base": int(vocab.is_base.sum()), "excluded": int(vocab.excluded.sum()),
            "novel": int((~vocab.is_base & ~vocab.excluded).sum())}


def _warn_changed(saved: Dict[str, Any], cfg: FinetuneConfig, info: DistInfo) -> None:
    """A resumed run only reproduces the uninterrupted one with the same settings; say which differ."""
    now = dataclasses.asdict(cfg)
    changed = [k for k in RESUME_KEYS if k in saved and _norm(saved[k]) != _norm(now[k])]
    if changed and info.is_main:
        print(f"warning: resuming with changed settings {changed}; the run will differ from an uninterrupted one",
              file=sys.stderr)


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _clip(params: List[nn.Parameter], max_norm: Optional[float]) -> float:
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _mean_over_ranks(values: Dict[str, float], info: DistInfo, dev: torch.device) -> Dict[str, float]:
    keys = sorted(values)
    t = all_reduce_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=dev)) / info.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def _evaluate(model: OVSAM, vocab: Vocabulary, samples: list, images: Any, dev: torch.device,
              cfg: FinetuneConfig) -> Dict[str, Any]:
    from training.evaluate import evaluate_model

    if cfg.max_eval_images:
        samples = samples[: cfg.max_eval_images]
    result = evaluate_model(model, vocab, samples, images, device=dev, modes=tuple(cfg.eval_prompts), max_examples=0)
    return result.metrics


def _provenance(cfg: FinetuneConfig, base: ModelArtifact, data: TrainingData, info: DistInfo,
                n_train: int, n_val: int, steps: int) -> Dict[str, Any]:
    return {
        "kind": "clip2sam-finetune",
        "base_model": str(cfg.base),
        "base_version": base.version,
        "data": data.source,
        "data_hash": data.data_hash,
        "train_images": n_train,
        "val_images": n_val,
        "skipped": data.report.as_dict(),
        "labels": list(data.labels),
        "command": cfg.command or " ".join(sys.argv),
        "git_commit": git_commit(),
        "epochs": cfg.epochs,
        "steps": steps,
        "seed": cfg.seed,
        "world_size": info.world_size,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hyperparameters": {k: v for k, v in dataclasses.asdict(cfg).items()
                            if k not in ("base", "out", "data", "label_config", "command")},
    }

