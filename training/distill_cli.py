"""`python -m training distill`'s command line: its parser and entry point, free of torch.

Kept apart from `training.distill` so that `--help` and argument errors answer at once; the
distillation code (torch, open_clip, the model) is imported only once the arguments parse.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from training.distill_config import DistillConfig


def build_parser() -> argparse.ArgumentParser:
    d = DistillConfig(images=[], features="", out="", config="tiny")
    p = argparse.ArgumentParser(prog="python -m training distill",
                                description="SAM2CLIP distillation: train the neck on dumped SAM embeddings. "
                                            "Multi-GPU: the same command under torchrun.")
    p.add_argument("--images", required=True, nargs="+", help="image folder(s)")
    p.add_argument("--features", required=True, help="folder of <stem>.pt SAM embeddings (dump-sam-features)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--base", help="start from this model artifact")
    src.add_argument("--config", help="start from a preset (rn50x16, rn50, ..., tiny); trunk from open_clip weights")
    p.add_argument("--out", required=True, help="model artifact to write")
    p.add_argument("--work-dir", help="checkpoints and logs (default <out>.run/)")
    p.add_argument("--clip", help="open_clip weights (file or pretrained tag) for --config")
    p.add_argument("--sam-checkpoint", help="SAM checkpoint: pos_embed (and with --config: prompt encoder, mask decoder)")
    p.add_argument("--labels", default="object", help="vocabulary stored with a --config model")
    p.add_argument("--recursive", action="store_true")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="images held out for a final MSE")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per process")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, help="default: min(500, 10%% of the run)")
    p.add_argument("--max-norm", type=float, default=d.max_norm)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--version")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-tensorboard", action="store_true")
    return p


def main_distill(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    cfg = DistillConfig(
        images=a.images, features=a.features, out=a.out, base=a.base, config=a.config, work_dir=a.work_dir, clip=a.clip,
        sam_checkpoint=a.sam_checkpoint, labels=tuple(s.strip() for s in a.labels.split(",") if s.strip()),
        recursive=a.recursive, val_fraction=a.val_fraction, epochs=a.epochs, max_steps=a.max_steps,
        batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
        max_norm=a.max_norm or None, seed=a.seed, device=a.device, amp=not a.no_amp, workers=a.workers,
        resume=a.resume, progress=not a.no_progress, tensorboard=not a.no_tensorboard, version=a.version,
        command="python -m training distill " + " ".join(argv))
    from training.distill import distill  # torch, open_clip and the model: only once the arguments are good

    summary = distill(cfg)
    if summary:  # rank 0
        print(json.dumps(summary))
    return 0
