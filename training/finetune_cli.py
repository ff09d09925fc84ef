"""`python -m training finetune`'s command line: its parser and entry point, free of torch.

Kept apart from `training.finetune` so that `--help` and argument errors answer at once; the
training code (torch, open_clip, the model) is imported only once the arguments parse.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from training.finetune_config import REFERENCE_VOCABULARIES, FinetuneConfig


def build_parser() -> argparse.ArgumentParser:
    d = FinetuneConfig(base="", out="")
    p = argparse.ArgumentParser(prog="python -m training finetune",
                                description="CLIP2SAM fine-tuning of OVSAM's head on a Label Studio export or COCO file. "
                                            "Multi-GPU: the same command under torchrun.")
    p.add_argument("--base", required=True, help="base model artifact (or a directory of the official weights)")
    p.add_argument("--data", required=True, help="Label Studio export JSON or COCO instances JSON")
    p.add_argument("--out", required=True, help="run directory: checkpoints, logs, TensorBoard, model.safetensors")
    p.add_argument("--label-config", help="Label Studio label config XML: the vocabulary and its synonyms")
    p.add_argument("--labels", help="comma-separated vocabulary (default: the label config, else the data's labels)")
    p.add_argument("--classifier-vocabulary", choices=REFERENCE_VOCABULARIES,
                   help="train against the reference's larger classifier, as its base-class training: coco = the 80 "
                        "classes with its texts (15 excluded), lvis = --data's LVIS categories; the training labels "
                        "(--labels, else the reference's base classes) are base, the others novel; the artifact keeps all")
    p.add_argument("--classifier-labels",
                   help="comma-separated classifier the head is trained against and the artifact keeps (a superset of "
                        "the training labels; the others are novel)")
    p.add_argument("--image-root", help="folder image paths are relative to (default: next to --data)")
    p.add_argument("--artifact", help="where to write the model (default <out>/model.safetensors)")
    p.add_argument("--version", help="model version (default <base version>-ft-<UTC timestamp>)")
    p.add_argument("--val-data", help="separate validation file (same format); default: hold out --val-fraction of --data")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="held-out share of tasks")
    p.add_argument("--split-seed", type=int, default=d.split_seed)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (0 with --fit-label-embeddings: only fit the label rows)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per process")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimiser step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--weight-decay-groups", choices=("reference", "extended"), default=d.weight_decay_groups,
                   help="reference (default): only norm layers skip weight decay, as the reference; extended: also "
                        "biases, tokens, 1-D parameters and LayerNorm2d")
    p.add_argument("--warmup-steps", type=int, help="default: min(500, 10%% of the run)")
    p.add_argument("--milestones", help="LR x gamma at these fractions of the run (default 8/12,11/12)")
    p.add_argument("--gamma", type=float, default=d.gamma)
    p.add_argument("--max-norm", type=float, default=d.max_norm, help="gradient clipping (0 = off; spec 0.01)")
    p.add_argument("--num-points", type=int, help="mask-loss points per mask (default 12544 at 1024 px, scaled)")
    p.add_argument("--num-proposals", type=int, default=d.num_proposals, help="prompts per image")
    p.add_argument("--num-box-prompts", type=int, default=d.num_box_prompts)
    p.add_argument("--ratio-range", default="0.9,2.0", help="LSJ scale range (LVIS used 0.1,2.0)")
    p.add_argument("--no-augment", action="store_true", help="no LSJ: the inference resize only")
    p.add_argument("--cache-features", action="store_true", help="with --no-augment: compute frozen features once")
    p.add_argument("--train-all", action="store_true",
                   help="pretrain from scratch: also train the CLIP trunk and SAM2CLIP neck (not the OVSAM recipe)")
    p.add_argument("--freeze-mask-decoder", action="store_true",
                   help="train recognition only (FPN + RoI head); masks stay as the base model makes them")
    p.add_argument("--freeze-fpn", action="store_true",
                   help="keep the base model's FPN: only the RoI projection learns (few annotations, known objects)")
    p.add_argument("--roi-pooling", choices=("box", "mask"), default=None,
                   help="average the head's RoI features over the box (OVSAM's) or the object's mask "
                        "(default: the base model's)")
    p.add_argument("--decoder-high-res", action="store_true",
                   help="add the trunk's stride-8/4 maps to the mask decoder's upscaling (sharper edges; "
                        "new weights start at zero, so train the decoder after)")
    p.add_argument("--image-size", type=int, default=None,
                   help="run the new model at this input side (multiple of 32; default: the base's): more pixels "
                        "for small objects, at more compute; train after, the features change scale")
    p.add_argument("--fit-label-embeddings", action="store_true",
                   help="first fit the annotated labels' embeddings to the base head's view of their objects "
                        "(names its text tower does not know; stored in the artifact and served)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: DEVICE or the local GPU)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--workers", type=int, default=d.workers, help="data-loading processes")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last.pt if it exists")
    p.add_argument("--checkpoint-interval", type=int, default=0, help="also checkpoint every N steps mid-epoch")
    p.add_argument("--eval-prompts", default="box,center", help="prompt modes of the final evaluation ('' = none)")
    p.add_argument("--eval-before", action="store_true", help="also evaluate the base model first")
    p.add_argument("--max-eval-images", type=int)
    p.add_argument("--cache-dir", help="text-embedding cache")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-tensorboard", action="store_true")
    return p


def config_from_args(args: argparse.Namespace, argv: Sequence[str]) -> FinetuneConfig:
    from training.vocab_cli import split_labels

    d = FinetuneConfig(base="", out="")
    floats = lambda s: tuple(float(x) for x in s.split(",") if x.strip())  # noqa: E731
    return FinetuneConfig(
        base=args.base, out=args.out, data=args.data, label_config=args.label_config,
        labels=[s.strip() for s in args.labels.split(",")] if args.labels else None, image_root=args.image_root,
        artifact=args.artifact, version=args.version, val_data=args.val_data, val_fraction=args.val_fraction,
        split_seed=args.split_seed, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr, weight_decay=args.weight_decay, weight_decay_groups=args.weight_decay_groups,
        warmup_steps=args.warmup_steps,
        milestones=floats(args.milestones) if args.milestones is not None else d.milestones,
        gamma=args.gamma, max_norm=args.max_norm or None, num_points=args.num_points,
        num_proposals=args.num_proposals, num_box_prompts=args.num_box_prompts, augment=not args.no_augment,
        ratio_range=floats(args.ratio_range), cache_features=args.cache_features, train_all=args.train_all, train_mask_decoder=not args.freeze_mask_decoder, train_fpn=not args.freeze_fpn,
        head_mask_pooling=None if args.roi_pooling is None else args.roi_pooling == "mask",
        decoder_high_res=args.decoder_high_res, fit_label_embeddings=args.fit_label_embeddings,
        classifier_vocabulary=args.classifier_vocabulary, classifier_labels=split_labels(args.classifier_labels),
        image_size=args.image_size, seed=args.seed, device=args.device,
        amp=not args.no_amp, workers=args.workers, resume=args.resume, checkpoint_interval=args.checkpoint_interval,
        eval_prompts=tuple(s.strip() for s in args.eval_prompts.split(",") if s.strip()), eval_before=args.eval_before,
        max_eval_images=args.max_eval_images, progress=not args.no_progress, tensorboard=not args.no_tensorboard,
        cache_dir=args.cache_dir, command="python -m training finetune " + " ".join(argv),
    )


def main_finetune(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, argv)
    from training.finetune import finetune  # torch, open_clip and the model: only once the arguments are good

    result = finetune(cfg)
    if result.metrics.get("val"):
        val = result.metrics["val"]
        print(json.dumps({"artifact": str(result.artifact), "version": result.version, "score": val.get("score"),
                          **{m: {"miou": val[m]["miou"], "accuracy": val[m]["accuracy"]} for m in val["prompt_modes"]}}))
    return 0
