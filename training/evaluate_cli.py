"""`python -m training evaluate`'s command line: its parser and entry point, free of torch.

Kept apart from `training.evaluate` so that `--help` and argument errors answer at once; the
evaluation (torch, cv2, the model) is imported only once the arguments parse.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

PROMPT_MODES = ("box", "center")
PRECISIONS = ("fp32", "bf16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training evaluate",
                                description="Per-instance mask IoU and classification accuracy with GT prompts.")
    p.add_argument("--model", required=True, help="model artifact (or official weights directory)")
    p.add_argument("--data", required=True, help="Label Studio export JSON or COCO instances JSON")
    p.add_argument("--image-root", help="folder image paths are relative to (default: next to --data)")
    p.add_argument("--prompt", choices=("box", "center", "both"), default="both")
    p.add_argument("--base-labels", help="comma-separated classes reported as base, the others as novel (the fusion's "
                        "base/novel weighting is the model's own: ovsam.vocabulary.resolve_vocabulary)")
    p.add_argument("--labels", help="comma-separated vocabulary (default: --label-config, else the data's labels)")
    p.add_argument("--label-config", help="Label Studio label config (XML file) giving the vocabulary")
    p.add_argument("--split", choices=("all", "val", "train"), default="all",
                   help="evaluate only the held-out part of the data (the same task split as finetune)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--clip-roi-boxes", choices=("pred_mask_box", "prompt_box", "faithful"),
                   help="override the model's CLIP-branch RoI rule (faithful = the reference's unscaled boxes, docs/REFERENCE_NOTES.md B1)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 as the reference evaluates (default), or bf16 autocast on CUDA as the backend serves")
    p.add_argument("--reference-vocabulary", choices=("coco", "lvis"),
                   help="classify as the paper's evaluation: coco = the reference's 80 class texts, 48 base / 17 novel, "
                        "the other 15 classes fused then excluded, only the 65 classes' instances scored; lvis = the "
                        "data's categories cleaned by the reference's rule, common+frequent base, rare novel, head RoIs "
                        "7x7 (the reference's LVIS config)")
    p.add_argument("--head-roi-size", type=int, help="override the head's RoIAlign size (default: the model's; 7 with "
                                                    "--reference-vocabulary lvis)")
    p.add_argument("--max-images", type=int)
    p.add_argument("--examples", type=int, default=8, help="images in the overlay figure")
    p.add_argument("--device")
    p.add_argument("--cache-dir", type=Path, help="text-embedding cache")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-progress", action="store_true")
    return p


def main_evaluate(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from training.evaluate import run_evaluation

    return run_evaluation(args)
