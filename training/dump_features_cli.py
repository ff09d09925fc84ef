"""`python -m training dump-sam-features`'s command line: its parser and entry point, free of torch.

Kept apart from `training.dump_features` so that `--help` and argument errors answer at once;
torch, cv2 and segment_anything are imported only once the arguments parse.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training dump-sam-features",
                                description="Dump SAM image embeddings (fp16 <stem>.pt per image) for SAM2CLIP distillation.")
    p.add_argument("--sam-checkpoint", required=True, help="official SAM checkpoint, e.g. sam_vit_h_4b8939.pth")
    p.add_argument("--model-type", default="vit_h", choices=("vit_h", "vit_l", "vit_b"))
    p.add_argument("--images", required=True, nargs="+", help="image folder(s)")
    p.add_argument("--recursive", action="store_true", help="also images in sub-folders (stems must stay unique)")
    p.add_argument("--out", required=True, type=Path, help="flat output folder")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: DEVICE or the local GPU)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--no-progress", action="store_true")
    return p


def main_dump_sam_features(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from training.dump_features import run_dump_sam_features

    return run_dump_sam_features(args)
