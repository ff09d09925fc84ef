"""`FinetuneConfig`: everything that decides a fine-tuning run, free of torch.

Its own module so that `python -m training finetune --help` (whose defaults come from here) and
argument errors answer without loading the model stack; `training.finetune` runs the configuration.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    from training import losses as L

REFERENCE_VOCABULARIES = ("coco", "lvis")

# The settings a resumed run must share with the interrupted one to reach the same weights.
RESUME_KEYS = ("base", "epochs", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "milestones",
               "gamma", "max_norm", "num_points", "augment", "seed", "val_fraction", "split_seed", "head_mask_pooling",
               "decoder_high_res", "fit_label_embeddings", "image_size", "classifier_vocabulary", "classifier_labels")


@dataclass
class FinetuneConfig:
    """Everything that decides a fine-tuning run (saved in checkpoints and the artifact's provenance)."""

    base: str
    out: str
    data: Optional[str] = None
    label_config: Optional[str] = None  # XML text or a file path
    labels: Optional[List[str]] = None
    image_root: Optional[str] = None
    artifact: Optional[str] = None  # default: <out>/model.safetensors
    version: Optional[str] = None  # default: <base>-ft-<UTC timestamp>
    val_data: Optional[str] = None  # a separate validation file (then all of `data` trains)
    val_fraction: float = 0.2
    split_seed: int = 0
    epochs: int = 12
    max_steps: Optional[int] = None  # cap on optimiser steps (quick runs, benchmarks; 0: only fit the label rows)
    batch_size: int = 2  # images per process and micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    weight_decay_groups: str = "reference"  # exempt only norm layers (the reference); "extended": also biases, tokens
    warmup_steps: Optional[int] = None  # default min(500, 10% of the run)
    milestones: Tuple[float, ...] = (8 / 12, 11 / 12)  # fractions of the run
    gamma: float = 0.1
    max_norm: Optional[float] = 0.01  # spec value; None or 0 disables clipping
    num_points: Optional[int] = None  # default 12544 at 1024 px, scaled with the image area
    oversample: float = 3.0
    importance: float = 0.75
    cls_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    background_weight: float = 0.1
    num_proposals: int = 40
    num_box_prompts: int = 21
    augment: bool = True
    ratio_range: Tuple[float, float] = (0.9, 2.0)
    cache_features: bool = False
    seed: int = 0
    device: Optional[str] = None
    amp: bool = True  # bf16 autocast on CUDA
    workers: int = 0
    resume: bool = False
    checkpoint_interval: int = 0  # optimiser steps between mid-epoch checkpoints (0: end of epoch only)
    eval_prompts: Tuple[str, ...] = ("box", "center")
    eval_before: bool = False
    max_eval_images: Optional[int] = None
    progress: bool = True
    tensorboard: bool = True
    cache_dir: Optional[str] = None  # text-embedding cache
    # Pretraining from scratch (e.g. the offline demo model): also train the CLIP trunk and the SAM2CLIP neck.
    # Not the OVSAM recipe, which keeps both frozen; only for models without pretrained CLIP/SAM weights.
    train_all: bool = False
    # False: only the recognition side (FPN, RoI head) trains and the masks stay exactly as they are. For a
    # project with few annotations whose objects the model already outlines well (new names, same kinds of objects).
    train_mask_decoder: bool = True
    # False: the FPN keeps the base model's features and only the RoI projection onto the text space learns
    # (a linear probe, 4k parameters in the demo model): for a handful of annotations of objects the base model
    # already tells apart under other names, where retraining the FPN overfits them.
    train_fpn: bool = True
    # The head's RoI pooling for this run and the new model: True averages over each object's mask, False over
    # its box (OVSAM's); None keeps the base model's. Switching it changes what the head reads, so train after.
    head_mask_pooling: Optional[bool] = None
    # True gives a base without them the decoder's high-resolution inputs (`OVSAMConfig.decoder_high_res`),
    # zero-initialised so training starts from the base's masks; a base that has them keeps them either way.
    decoder_high_res: bool = False
    # The input side the new model runs at (a multiple of 32); None keeps the base's. A larger side gives small
    # objects more pixels (`OVSAM.set_image_size`); the head and decoder see features of another scale, so train.
    image_size: Optional[int] = None
    # True: before training, the rows of the project's annotated labels are fitted to the base head's
    # embeddings of their objects (`training.label_fit`), and training and the artifact use the fitted rows.
    # For names the base model's text tower does not tie to objects it already tells apart.
    fit_label_embeddings: bool = False
    # The classifier the head's logits are computed against, saved as the artifact's vocabulary (None: the training
    # labels). "coco" / "lvis": the reference's vocabularies (its texts; COCO's 15 unsplit classes excluded), as its
    # CLIP2SAM training on the 48 base classes against all 80. `classifier_labels`: a label list. The training labels
    # must be in it and are its base classes; the others are negatives in the softmax and novel when served.
    classifier_vocabulary: Optional[str] = None
    classifier_labels: Optional[List[str]] = None
    command: Optional[str] = None

    def __post_init__(self) -> None:
        if self.cache_features and self.train_all:
            raise ValueError("--cache-features cannot be used with --train-all: the trunk and neck change")
        if self.cache_features and self.augment:
            raise ValueError("--cache-features needs --no-augment: augmented images change every epoch")
        if self.decoder_high_res and not self.train_mask_decoder:
            raise ValueError("--decoder-high-res adds decoder weights that only train with the mask decoder")
        if self.image_size is not None and (self.image_size < 32 or self.image_size % 32):
            raise ValueError(f"--image-size must be a positive multiple of 32, got {self.image_size}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError("--max-steps must be >= 0")
        if self.max_steps == 0 and not self.fit_label_embeddings:
            raise ValueError("--max-steps 0 trains nothing; with --fit-label-embeddings it only fits the label rows")
        if self.classifier_vocabulary is not None and self.classifier_labels:
            raise ValueError("give --classifier-vocabulary or --classifier-labels, not both")
        if self.classifier_vocabulary not in (None, *REFERENCE_VOCABULARIES):
            raise ValueError(f"unknown classifier vocabulary {self.classifier_vocabulary!r}; "
                             f"use {' or '.join(REFERENCE_VOCABULARIES)}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 1:
            raise ValueError("batch size, gradient accumulation and epochs must be >= 1")
        from training.evaluate_cli import PROMPT_MODES  # checked now, not after hours of training

        unknown = [m for m in self.eval_prompts if m not in PROMPT_MODES]
        if unknown:
            raise ValueError(f"unknown evaluation prompt mode(s) {unknown}; use {', '.join(PROMPT_MODES)}")

    def loss_config(self, image_size: int) -> L.LossConfig:
        from training import losses as L

        return L.LossConfig(self.cls_weight, self.mask_weight, self.dice_weight, self.background_weight,
                            self.num_points or L.default_num_points(image_size), self.oversample, self.importance)


def changed_settings(saved: Dict[str, Any], cfg: FinetuneConfig) -> List[str]:
    """The `RESUME_KEYS` whose value in a checkpoint's saved configuration differs from `cfg`'s."""
    now = dataclasses.asdict(cfg)
    return [k for k in RESUME_KEYS if k in saved and _norm(saved[k]) != _norm(now[k])]


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v
